"""The live page: http://127.0.0.1:PORT/ shows the newest published image as an MJPEG stream (/stream.mjpg).

A stand-in until the steerable page (live controls, figures) lands: it keeps the stats it is given
(`publish_stats`, the live loop's figures) and shows only the images. Standard-library HTTP only. The socket is bound when the server is made (sample.py does it while checking
its flags, so a port in use is refused before the avatar loads); `start` then serves it on a thread.
"""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import numpy as np
from PIL import Image

PAGE = b"""<!doctype html><title>svp live</title><body style="background:#111;color:#ccc;font-family:sans-serif">
<p>driving | avatar</p><img src="/stream.mjpg" style="image-rendering:pixelated;height:80vh"></body>"""


class LivePage:
    """The page on 127.0.0.1:`port` (0: a free port the system picks; `url` tells which). Binding raises
    OSError (port in use, a privileged port). controls: what the page may change (live/controls.py)."""

    def __init__(self, port: int, controls=None):
        self.jpeg, self.closed, self.changed = None, False, threading.Condition()
        self.controls, self.stats = controls, None
        self.thread = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.end_headers()
                    self.wfile.write(PAGE)
                elif self.path == "/stream.mjpg":
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                    self.end_headers()
                    server.send_stream(self.wfile)
                else:
                    self.send_error(404)

            def log_message(self, *args):  # the terminal shows the run's progress, not every request
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def start(self) -> "LivePage":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def send_stream(self, out):
        last = None
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.closed or (self.jpeg is not None and self.jpeg is not last), 1.0)
                if self.closed:
                    return
                jpeg = last = self.jpeg
            if jpeg is None:
                continue
            try:
                out.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
                out.write(jpeg + b"\r\n")
                out.flush()
            except OSError:  # the viewer went away
                return

    def publish(self, image: np.ndarray):
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        with self.changed:
            self.jpeg = buffer.getvalue()
            self.changed.notify_all()

    def publish_stats(self, stats: dict):
        self.stats = stats

    def close(self):
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        if self.thread is not None:  # shutdown() waits for serve_forever, which never ran otherwise
            self.httpd.shutdown()
        self.httpd.server_close()
