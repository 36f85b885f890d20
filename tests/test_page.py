"""live/page.py: the live page, served (urllib: fast) and seen in a real browser (Debian's Chromium, driven
by selenium through chromedriver): the image, the figures, the controls, who may steer, the layout.

The browser tests are skipped, saying why, only where Chromium is not installed (.ci/run installs it).
"""
import contextlib
import io
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from live.controls import Controls, LiveSettings
from live.page import LivePage

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INITIAL = LiveSettings(prompt="a photo of sks person")
STATS = {"frames": 120, "dropped": 3, "fps": 24.7, "latency_ms": {"median": 83.2, "p90": 101.5},
         "stages_ms": {"read": 1.2, "track": 21.3, "sample": 40.1, "output": 4.2}, "message": "camera at 30 fps"}


@pytest.fixture
def page():
    page = LivePage(0, Controls(INITIAL)).start()
    yield page
    page.close()


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post(page: LivePage, changes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(page.url + "controls", data=json.dumps(changes).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def mjpeg_frames(url: str, timeout: float):
    """The JPEGs of the page's MJPEG stream (multipart/x-mixed-replace) as they come. A part has no length:
    it ends where the next boundary begins, sent with the part (see LivePage.send_stream), so reading a
    frame never waits for the next one to be published."""
    with urllib.request.urlopen(url, timeout=timeout) as stream:
        assert stream.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        assert stream.readline() == b"--frame\r\n"
        while True:
            headers = dict(line.decode().strip().split(": ", 1) for line in iter(stream.readline, b"\r\n"))
            assert headers["Content-Type"] == "image/jpeg"
            lines = []
            while not (len(lines) > 1 and lines[-1] == b"--frame\r\n" and lines[-2].endswith(b"\r\n")):
                lines.append(stream.readline())
            image = Image.open(io.BytesIO(b"".join(lines[:-1])[:-2]))
            image.load()
            yield image


def jpegs_from(url: str, count: int, timeout: float) -> list[Image.Image]:
    """The first `count` JPEGs of the stream."""
    frames = mjpeg_frames(url, timeout)
    try:
        return [next(frames) for _ in range(count)]
    finally:
        frames.close()


def solid(color, height=64, width=128) -> np.ndarray:
    return np.full((height, width, 3), color, np.uint8)


# The server, through urllib.

def test_the_page_carries_a_token_of_its_own_and_the_settings(page):
    status, html = get(page.url)
    assert status == 200 and page.token.encode() in html and b"a photo of sks person" in html
    other = LivePage(0)
    try:
        assert len(page.token) >= 32 and other.token != page.token
    finally:
        other.close()


def test_the_stream_sends_each_newest_frame_without_waiting_for_the_next(page):
    page.publish(solid((200, 30, 30)))
    frames = mjpeg_frames(page.url + "stream.mjpg", timeout=10)
    try:
        first = next(frames)  # whole while it is the only frame published (else: a read timeout)
        page.publish(solid((30, 30, 200)))
        second = next(frames)
    finally:
        frames.close()
    assert [tuple(np.asarray(f)[32, 64] // 50) for f in (first, second)] == [(4, 0, 0), (0, 0, 4)]


def test_the_stats_are_served_as_published(page):
    assert get(page.url + "stats.json") == (200, b"{}")
    page.publish_stats(STATS)
    assert json.loads(get(page.url + "stats.json")[1]) == STATS
    # numpy numbers are numbers; a figure not yet known (NaN) is null, which JSON can hold
    page.publish_stats({**STATS, "frames": np.int64(0), "fps": np.float32(2.5), "latency_ms": {"median": np.nan}})
    assert json.loads(get(page.url + "stats.json")[1]) == {**STATS, "frames": 0, "fps": 2.5,
                                                           "latency_ms": {"median": None}}


def test_a_change_with_the_token_is_applied(page):
    status, reply = post(page, {"morph": "Tom Cruise", "morph_weight": "0.3"}, {"X-Token": page.token})
    assert status == 200
    version, settings = page.controls.current()
    assert version == 1
    assert settings == LiveSettings(prompt="a photo of sks person", morph="Tom Cruise", morph_weight=0.3)
    assert reply["settings"]["morph"] == "Tom Cruise"


def test_a_bad_value_is_refused_in_one_line_and_changes_nothing(page):
    status, reply = post(page, {"morph": "Tom Cruise", "morph_weight": "1.5"}, {"X-Token": page.token})
    assert status == 400 and reply["error"] == "morph_weight: must be between 0 and 1, got '1.5'"
    assert page.controls.current() == (0, INITIAL) and reply["settings"]["morph"] is None
    status, reply = post(page, ["morph"], {"X-Token": page.token})
    assert status == 400 and "wants a JSON object" in reply["error"]


@pytest.mark.parametrize("headers", [
    {},                                                           # no token: any other page, any program
    {"X-Token": "guessed"},
    {"X-Token": "TOKEN", "Origin": "http://evil.example"},        # a page elsewhere that learnt the token
    {"X-Token": "TOKEN", "Origin": "null"},                       # a sandboxed frame or a file:// page
    {"X-Token": "TOKEN", "Host": "evil.example:PORT"},            # DNS rebinding: evil.example -> 127.0.0.1
], ids=["no-token", "wrong-token", "foreign-origin", "null-origin", "rebound-host"])
def test_a_control_request_from_elsewhere_is_refused(page, headers):
    headers = {name: value.replace("TOKEN", page.token).replace("PORT", str(page.port))
               for name, value in headers.items()}
    status, reply = post(page, {"morph": "evil"}, headers)
    assert status == 403 and reply["error"].startswith("refused")
    assert page.controls.current() == (0, INITIAL)


def test_the_page_and_its_token_are_served_to_this_server_s_names_only(page):
    """A rebound name (evil.example resolving to 127.0.0.1) must not read the token; localhost may."""
    status, html = get(page.url, {"Host": f"evil.example:{page.port}"})
    assert status == 403 and page.token.encode() not in html
    assert get(page.url, {"Host": f"localhost:{page.port}"})[0] == 200
    assert post(page, {"morph": "x"}, {"X-Token": page.token, "Origin": f"http://localhost:{page.port}"})[0] == 200
    # the image and the figures are read-only: open to any page
    assert get(page.url + "stats.json", {"Host": "evil.example"})[0] == 200


def test_a_page_without_controls_offers_none():
    page = LivePage(0).start()
    try:
        status, html = get(page.url)
        assert status == 200 and b'"settings": null' in html
        assert post(page, {"morph": "x"}, {"X-Token": page.token}) == (404, {"error": "this run has no controls"})
    finally:
        page.close()


def test_a_taken_port_is_refused_at_construction():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            LivePage(taken.getsockname()[1])


def test_close_ends_open_streams(page):
    page.publish(solid((0, 0, 0)))
    with urllib.request.urlopen(page.url + "stream.mjpg", timeout=10) as stream:
        stream.read(100)
        page.close()
        stream.read()  # returns (the server ended the reply) rather than timing out


# The page in Chromium.

@contextlib.contextmanager
def headless_chromium():
    """Debian's Chromium under selenium, headless, with a throwaway profile (bench/page.py uses it too)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        # without the background-networking flags Chromium's own connections fail on a closed network
        for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}: Debian's chromium, chromium-driver)")
    with headless_chromium() as driver:
        yield driver


def open_page(browser, url: str, width=900, height=600):
    """`url` in a `width` x `height` viewport (the window's inside, whatever the browser's frame)."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    browser.get(url)


def wait(condition, seconds=20.0):
    """Until `condition()` is truthy (returned), or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert time.monotonic() < deadline, f"still {result!r} after {seconds} s"
        time.sleep(0.05)
    return result


def shown_color(browser) -> tuple:
    """The colour at the middle of the <img> as the screen shows it, in steps of 50 (JPEG is lossy)."""
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    box = browser.find_element("id", "live").rect
    return tuple(shot[int(box["y"] + box["height"] / 2), int(box["x"] + box["width"] / 2)] // 50)


def text(browser, element_id: str) -> str:
    return browser.find_element("id", element_id).text


def wait_for_text(browser, element_id: str, expected: str, seconds=20.0):
    deadline = time.monotonic() + seconds
    while (shown := text(browser, element_id)) != expected:
        assert time.monotonic() < deadline, f"#{element_id} shows {shown!r}, not {expected!r}, after {seconds} s"
        time.sleep(0.05)


def type_into(field, value: str):
    """Replace the field's text as a user does (select all, type, Enter): WebDriver's clear() would post the
    empty field first."""
    from selenium.webdriver.common.keys import Keys
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.ENTER)


def test_the_page_shows_the_newest_frame(browser, page):
    page.publish(solid((200, 30, 30)))
    open_page(browser, page.url)
    wait(lambda: shown_color(browser) == (4, 0, 0))
    page.publish(solid((30, 30, 200)))
    wait(lambda: shown_color(browser) == (0, 0, 4), seconds=5)


def test_a_page_without_controls_shows_none(browser):
    page = LivePage(0).start()
    try:
        open_page(browser, page.url)
        assert browser.find_elements("css selector", "form, input") == []
        assert browser.find_element("id", "fps").text == "–"  # the figures are there, still unknown
    finally:
        page.close()


def test_the_numbers_move(browser, page):
    page.publish_stats(STATS)
    open_page(browser, page.url)
    wait_for_text(browser, "fps", "24.7")
    assert text(browser, "latency") == "83 ms median · 102 p90"
    assert text(browser, "dropped") == "3 (2.4%)" and text(browser, "frames") == "120"
    assert text(browser, "stages").split("\n") == ["read 1.2 ms", "track 21.3 ms", "sample 40.1 ms", "output 4.2 ms"]
    assert text(browser, "message") == "camera at 30 fps"
    page.publish_stats({**STATS, "fps": 12.5, "frames": 240, "stages_ms": {"read": 1.0, "track": 80.0},
                        "message": None})
    wait_for_text(browser, "fps", "12.5")
    assert text(browser, "frames") == "240" and text(browser, "stages").split("\n") == ["read 1.0 ms", "track 80.0 ms"]
    assert text(browser, "message") == ""
    page.close()  # the run ends: the page says so
    wait(lambda: "ended" in text(browser, "message"))


def test_a_change_made_in_the_page_reaches_the_loop(browser, page):
    """The morph typed and its weight nudged with the keyboard reach Controls, and a stand-in for the live
    loop, polling `current()` per frame as the loop does, sees them as new versions."""
    from selenium.webdriver.common.keys import Keys
    seen, running = [], threading.Event()
    running.set()

    def loop():  # the live loop's side of the contract: act only when the version moved
        version = 0
        while running.is_set():
            now, settings = page.controls.current()
            if now != version:
                version = now
                seen.append((version, settings))
            time.sleep(0.005)
    consumer = threading.Thread(target=loop)
    consumer.start()
    try:
        open_page(browser, page.url)
        type_into(browser.find_element("css selector", "input[name=morph]"), "Tom Cruise")
        wait(lambda: seen and seen[-1][1].morph == "Tom Cruise")
        slider = browser.find_element("css selector", "input[type=range][name=morph_weight]")
        slider.send_keys(Keys.ARROW_RIGHT * 5)  # 0.5 -> 0.55, a change per key
        wait(lambda: seen[-1][1].morph_weight == 0.55)
        number = browser.find_element("css selector", "input[type=number][name=morph_weight]")
        assert number.get_attribute("value") == "0.55"  # the number box follows its slider
    finally:
        running.clear()
        consumer.join()
    assert page.controls.current() == seen[-1]
    assert seen[-1][1] == LiveSettings(prompt="a photo of sks person", morph="Tom Cruise", morph_weight=0.55)
    assert [version for version, _ in seen] == sorted({version for version, _ in seen})
    assert text(browser, "control-message") == ""


def test_a_bad_value_shows_its_message_and_changes_nothing(browser, page):
    open_page(browser, page.url)
    number = browser.find_element("css selector", "input[type=number][name=morph_weight]")
    type_into(number, "1.5")
    wait_for_text(browser, "control-message", "morph_weight: must be between 0 and 1, got '1.5'")
    assert page.controls.current() == (0, INITIAL)
    assert number.get_attribute("value") == "0.5"  # the page goes back to what the run uses
    assert "refused" in number.get_attribute("class")  # and marks the field
    type_into(number, "0.25")  # the next good value is taken
    wait(lambda: page.controls.current()[1].morph_weight == 0.25)
    wait_for_text(browser, "control-message", "")
    assert "refused" not in number.get_attribute("class")


def test_another_site_open_in_the_browser_cannot_steer(browser, page):
    """A page from another origin (here 127.0.0.1 on another port) posts to /controls and tries to read our
    page for its token: the post is refused and the read is blocked by the browser."""
    attack = f"""<script>
        const target = "{page.url}";
        document.title = "started";
        Promise.allSettled([
          fetch(target + "controls", {{method: "POST", mode: "no-cors", body: '{{"morph": "evil"}}'}}),
          fetch(target).then((reply) => reply.text()),
        ]).then((results) => {{ document.title = results.map((r) => r.status).join(" "); }});
        </script>""".encode()

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args):
            pass
    evil = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        open_page(browser, f"http://127.0.0.1:{evil.server_address[1]}/")
        # the no-cors post is sent (and fulfilled, opaquely); reading our page is refused by the browser
        assert wait(lambda: browser.title if browser.title != "started" else None) == "fulfilled rejected"
    finally:
        evil.shutdown()
        evil.server_close()
    assert page.controls.current() == (0, INITIAL)


@pytest.mark.parametrize("width, height", [(900, 600), (1920, 1080), (600, 900)])
def test_the_page_fits_the_window(browser, page, width, height):
    """No scrollbars, the panel's content whole, and the image (2:1, driving | avatar) given most of the room."""
    page.publish(solid((90, 90, 90), 512, 1024))
    page.publish_stats({**STATS, "stages_ms": {f"stage {i}": 10.0 * i for i in range(6)},
                        "message": "a long message that wraps: " + "word " * 20})
    open_page(browser, page.url, width, height)
    wait_for_text(browser, "fps", "24.7")
    sizes = browser.execute_script("""const page = document.scrollingElement, panel = document.querySelector("aside"),
        image = document.getElementById("live").getBoundingClientRect();
        return [page.scrollWidth, page.scrollHeight, page.clientWidth, page.clientHeight,
                panel.scrollHeight, panel.clientHeight, Math.min(image.width, 2 * image.height)];""")
    page_width, page_height, view_width, view_height, panel_content, panel_box, image_width = sizes
    assert (page_width, page_height) == (view_width, view_height) == (width, height)
    if width >= 900:  # a tall, narrow window gives the panel at most 60% of its height, and it may scroll
        assert panel_content <= panel_box
    assert image_width >= 0.6 * width  # the width the 2:1 image is shown at
