"""The live page: http://127.0.0.1:PORT/ shows the newest published image (driving | avatar, an MJPEG stream),
the run's figures (frames/s, latency, dropped frames, each stage's ms, a message), and controls that steer
the run (live/controls.py) while it plays.

Standard-library HTTP only. The socket is bound when the page is made (sample.py does it while checking its
flags, so a port in use is refused before the avatar loads); `start` then serves it on a thread.

    GET  /             the page (live/page.html), carrying this run's token
    GET  /stream.mjpg  the newest image, as multipart JPEGs
    GET  /stats.json   the newest figures (the page polls it)
    POST /controls     {name: value}: `Controls.update`; 200 with the settings, 400 with a one-line error

Who may steer: only the page this run served. The server listens on 127.0.0.1 alone, and a control
request must carry the token that page holds (a random secret made per run) in the X-Token header, so a
web page from elsewhere open in the same browser cannot change the run: it can send a request but cannot
read our page to learn the token, and the custom header needs a CORS preflight we never grant. A Host or
Origin naming anything but this server (127.0.0.1:PORT or localhost:PORT) is refused too, on the page and
on controls: a DNS-rebinding page (evil.example resolved to 127.0.0.1) would otherwise be "same origin" and
could read the token. The image and the figures are read-only and stay open to any GET.
"""
import hmac
import json
import math
import secrets
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from live.controls import Controls

PAGE = (Path(__file__).parent / "page.html").read_text()


class LivePage:
    """The page on 127.0.0.1:`port` (0: a free port the system picks; `url` tells which), steering `controls`
    (None: a page without controls, e.g. tracking-only). Binding raises OSError (port in use, a privileged
    port)."""

    def __init__(self, port: int, controls: Controls | None = None):
        self.controls = controls
        self.token = secrets.token_urlsafe(32)
        self.jpeg, self.stats, self.closed, self.changed = None, b"{}", False, threading.Condition()
        self.thread = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler_for(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "LivePage":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def publish(self, image: np.ndarray):
        """Show `image` (uint8 HxWx3) as the newest frame."""
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        with self.changed:
            self.jpeg = buffer.getvalue()
            self.changed.notify_all()

    def publish_stats(self, stats: dict):
        """Show the run's figures: {"frames": int, "dropped": int, "fps": float, "latency_ms": {"median": float,
        "p90": float}, "stages_ms": {stage: ms}, "message": str | None}. Serialised here, once (a figure not
        yet known, NaN or None, as null), so a page's polls cost the publisher nothing."""
        self.stats = json.dumps(plain(stats)).encode()

    def close(self):
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        if self.thread is not None:  # shutdown() waits for serve_forever, which never ran otherwise
            self.httpd.shutdown()
        self.httpd.server_close()

    # What the request handler asks of the page.

    def own_hosts(self) -> set[str]:
        return {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}

    def html(self) -> bytes:
        run = {"token": self.token, "settings": None if self.controls is None else asdict(self.controls.current()[1])}
        # "<" escaped: a prompt holding "</script>" must stay text inside the script element
        return PAGE.replace("/*RUN*/null", json.dumps(run).replace("<", "\\u003c")).encode()

    def steer(self, changes) -> tuple[int, dict]:
        """(HTTP status, JSON reply) of a control request that passed the token check."""
        if self.controls is None:
            return 404, {"error": "this run has no controls"}
        if not isinstance(changes, dict):
            return 400, {"error": "controls: wants a JSON object {name: value}"}
        try:
            settings = self.controls.update(changes)
        except ValueError as error:
            return 400, {"error": str(error), "settings": asdict(self.controls.current()[1])}
        return 200, {"settings": asdict(settings)}

    def send_stream(self, out):
        """Each newest JPEG as one part of a multipart reply, the next part's header sent right after it:
        Chromium shows a part only once the next one has begun, so each frame would otherwise show only
        when the one after it arrives."""
        part_header = b"Content-Type: image/jpeg\r\n\r\n"
        last = None
        out.write(b"--frame\r\n" + part_header)
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.closed or self.jpeg is not last)
                if self.closed:
                    return
                jpeg = last = self.jpeg
            try:
                out.write(jpeg + b"\r\n--frame\r\n" + part_header)
                out.flush()
            except OSError:  # the viewer went away
                return


def plain(value):
    """`value` as JSON can hold it: numpy scalars as numbers, NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def handler_for(page: LivePage):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                if self.foreign():
                    return self.reply(403, "text/plain", b"open this page as " + page.url.encode() + b"\n")
                self.reply(200, "text/html; charset=utf-8", page.html())
            elif self.path == "/stats.json":
                self.reply(200, "application/json", page.stats)
            elif self.path == "/stream.mjpg":
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                page.send_stream(self.wfile)
            else:
                self.send_error(404)

        def do_POST(self):
            if self.path != "/controls":
                return self.send_error(404)
            token = self.headers.get("X-Token", "").encode()
            if self.foreign() or not hmac.compare_digest(token, page.token.encode()):
                return self.json(403, {"error": "refused: only the page this run served may steer it"})
            try:
                length = min(max(int(self.headers.get("Content-Length") or 0), 0), 1 << 16)  # at most 64 KiB
                changes = json.loads(self.rfile.read(length))
            except ValueError:
                return self.json(400, {"error": "controls: the request is not JSON"})
            self.json(*page.steer(changes))

        def foreign(self) -> bool:
            """A request naming another site: a Host or Origin that is not this server."""
            origin = self.headers.get("Origin")
            return (self.headers.get("Host") not in page.own_hosts()
                    or origin is not None and origin not in {f"http://{host}" for host in page.own_hosts()})

        def json(self, status: int, reply: dict):
            self.reply(status, "application/json", json.dumps(reply).encode())

        def reply(self, status: int, content_type: str, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the terminal shows the run's progress, not every request
            pass
    return Handler
