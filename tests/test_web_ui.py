"""The Gradio web app in headless Chromium (Debian's `chromium`, driven by Playwright): upload an image, chat,
watch the answer stream in; retry / clear; and the same app talking to a running server (--server-url).

Skips only when no Chromium binary is installed (CI installs Debian's `chromium`). The browser may reach
127.0.0.1 only: every other request is blocked and the test fails if the page tried one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from background_server import BackgroundServer  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium binary (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page whose requests to anything but this machine are refused (and remembered)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.external = []

    def route(r):
        if r.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            r.continue_()
        else:
            page.external.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    yield page
    page.close()
    assert page.external == [], f"the page tried to reach outside: {page.external[:5]}"


@pytest.fixture(scope="module")
def web():
    with BackgroundServer(["web", "--model", "tiny", "--max-model-len", "1024"]) as s:
        yield s


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    img = Image.new("RGB", (320, 240), (240, 240, 230))
    img.paste((220, 40, 40), (30, 30, 150, 150))
    img.paste((40, 90, 220), (170, 90, 300, 220))
    img.save(path)
    return path


def set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def assistant_text(page) -> str:
    bots = page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid=bot]")
    return bots.last.inner_text().strip() if bots.count() else ""


def watch_answer(page, timeout=60) -> list[str]:
    """Every distinct text the answer bubble showed, until it stopped changing for 1.5 s."""
    seen, last_change, deadline = [], time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = assistant_text(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            last_change = time.monotonic()
        elif seen and time.monotonic() - last_change > 1.5:
            return seen
        time.sleep(0.03)
    raise AssertionError(f"answer still changing after {timeout} s")


def ask(page, question: str) -> list[str]:
    page.locator("#message textarea").fill(question)
    page.locator("#message textarea").press("Enter")
    return watch_answer(page)


def test_upload_image_and_chat_with_a_streamed_answer(chatty_web, page, image_file):
    """On the untrained checkpoint: the trained tiny model's answers are a few words, which may arrive in one step."""
    page.goto(chatty_web.url)
    page.wait_for_selector("#message textarea")
    page.locator("#image-input input[type=file]").set_input_files(str(image_file))
    page.wait_for_selector("#image-input img")
    set_slider(page, "max-tokens", 160)
    seen = ask(page, "What is in this image?")
    assert len(seen) >= 2, f"the answer did not stream: {seen}"
    assert len(seen[-1]) > len(seen[0])  # it grew (rendered markdown, so not always prefix by prefix)
    assert "What is in this image?" in page.locator("#chatbot").inner_text()

    set_slider(page, "max-tokens", 24)
    second = ask(page, "And their colours?")  # multi-turn on the same image
    assert second[-1]
    assert page.locator("#chatbot").inner_text().count("?") >= 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui.png"), full_page=True)


def test_retry_and_clear(web, page):
    page.goto(web.url)
    page.wait_for_selector("#message textarea")
    assert "synthetic" in page.locator("#tiny-note").inner_text()  # the tiny model says what it knows
    set_slider(page, "max-tokens", 24)
    set_slider(page, "temperature", 1.5)
    ask(page, "Say anything.")
    page.locator("#retry").click()
    watch_answer(page)
    chat = page.locator("#chatbot").inner_text()
    assert chat.count("Say anything.") == 1  # the question is asked again, not duplicated
    page.locator("#clear").click()
    page.wait_for_function("!document.querySelector('#chatbot').innerText.includes('Say anything.')", timeout=10000)


def test_web_app_over_a_running_server(page, image_file):
    with BackgroundServer(["serve", "--model", "tiny", "--max-model-len", "1024", "--api-key", "k",
                           "--log-level", "warning"]) as api:
        with BackgroundServer(["web", "--server-url", f"{api.url}/v1", "--api-key", "k"]) as web:
            page.goto(web.url)
            page.wait_for_selector("#message textarea")
            assert "synthetic" in page.locator("#tiny-note").inner_text()
            assert page.locator("#video-input").count() == 0 or not page.locator("#video-input").is_visible()
            page.locator("#image-input input[type=file]").set_input_files(str(image_file))
            page.wait_for_selector("#image-input img")
            set_slider(page, "max-tokens", 40)
            seen = ask(page, "What is this?")
            assert seen and seen[-1]


# --------------------------------------------------------------------------- stopping, clearing, typing, bad files


@pytest.fixture(scope="module")
def chatty_web(tmp_path_factory):
    """The app on an untrained checkpoint: at temperature 1 it rambles until max_new_tokens (EOS is 1 id in 128k),
    so a stream lasts long enough to stop, clear or type into."""
    from cogvlm2.tiny.recipe import initial_checkpoint

    folder = initial_checkpoint("tiny", tmp_path_factory.mktemp("random") / "ckpt", list(range(128256)), seed=0)
    with BackgroundServer(["web", "--model", str(folder), "--max-model-len", "2048"]) as s:
        yield s


def start_long_answer(page, question="Tell me everything."):
    set_slider(page, "max-tokens", 1500)
    set_slider(page, "temperature", 1)
    page.locator("#message textarea").fill(question)
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("document.querySelector('#chatbot').innerText.length > 40", timeout=60000)


def test_stop_ends_the_stream_and_keeps_what_was_shown(chatty_web, page):
    page.goto(chatty_web.url)
    page.wait_for_selector("#message textarea")
    start_long_answer(page)
    page.locator("#stop").click()
    stopped = watch_answer(page, timeout=20)[-1]  # stops changing at once
    time.sleep(2)
    assert assistant_text(page) == stopped and len(stopped) < 6000  # far from 1,500 tokens
    set_slider(page, "max-tokens", 5)
    assert ask(page, "Still there?")[-1]  # the app answers the next question


def test_clear_during_a_stream_stops_it_and_clears(chatty_web, page):
    page.goto(chatty_web.url)
    page.wait_for_selector("#message textarea")
    start_long_answer(page, "First question.")
    page.locator("#clear").click()
    page.wait_for_function("!document.querySelector('#chatbot').innerText.includes('First question.')", timeout=10000)
    time.sleep(2)  # a stream that kept running would write the conversation back
    assert "First question." not in page.locator("#chatbot").inner_text()
    set_slider(page, "max-tokens", 5)
    ask(page, "Fresh start.")
    chat = page.locator("#chatbot").inner_text()
    assert "Fresh start." in chat and "First question." not in chat  # the history really went


def test_typing_during_a_stream_is_kept_and_sent_after(chatty_web, page):
    page.goto(chatty_web.url)
    page.wait_for_selector("#message textarea")
    set_slider(page, "max-tokens", 120)
    set_slider(page, "temperature", 1)
    page.locator("#message textarea").fill("First question.")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("document.querySelector('#chatbot').innerText.length > 30", timeout=60000)
    box = page.locator("#message textarea")
    box.press_sequentially("Second question.", delay=20)
    time.sleep(1.0)  # more deltas arrive while the text sits in the box
    assert box.input_value() == "Second question."  # not wiped by the stream
    box.press("Enter")  # queued behind the running answer
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('Second question.')", timeout=120000)
    watch_answer(page, timeout=120)
    chat = page.locator("#chatbot").inner_text()
    assert chat.index("First question.") < chat.index("Second question.")
    assert box.input_value() == ""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui_queued.png"), full_page=True)


def test_a_corrupt_upload_is_a_short_readable_error(web, page, tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is not a PNG at all" * 10)
    page.goto(web.url)
    page.wait_for_selector("#message textarea")
    page.locator("#image-input input[type=file]").set_input_files(str(bad))
    toast = page.locator(".toast-body, [data-testid=toast-body]").first
    toast.wait_for(timeout=20000)
    text = toast.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui_corrupt_upload.png"), full_page=True)
    assert "could not be read" in text and "not an image" in text
    assert "/tmp" not in text and "gradio" not in text.lower() and "Traceback" not in text


# --------------------------------------------------------------------------- the engine after Stop / Clear


def engine_of(server):
    """The in-process engine (AsyncLLM) behind a `web` BackgroundServer: its app keeps the backend."""
    return server._server.config.app.state.backend.engine


def live_request_ids(engine) -> set[str]:
    """Requests the engine holds anywhere: its table, the scheduler's running and waiting queues."""
    llm = engine.engine
    return set(llm.seqs) | {s.request_id for s in (*llm.scheduler.running, *llm.scheduler.waiting)}


def click_until_heard(page, selector: str, heard: list, attempts: int = 3, wait_s: float = 4.0) -> int:
    """Click until the app's handler has run (`heard` grows); the clicks it took. Headless Chromium under a
    fast stream (hundreds of chatbot re-renders a second on the tiny model) sometimes loses a click before
    Gradio's frontend sends it, about one in six here; a user clicks again, and so does this."""
    for attempt in range(1, attempts + 1):
        page.locator(selector).click()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if heard:
                return attempt
            time.sleep(0.05)
    raise AssertionError(f"{attempts} clicks on {selector} never reached the app")


def wait_engine_idle(engine, timeout: float):
    """The engine's stats once no request runs or waits and every KV block is free (AssertionError after
    `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.num_running == s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return s
        assert time.monotonic() < deadline, f"the engine still holds a request after {timeout} s: {s}"
        time.sleep(0.05)


@pytest.mark.parametrize("button", ["stop", "clear"])
def test_stop_and_clear_free_the_engines_kv_blocks(chatty_web, page, button, monkeypatch):
    """Stop (or Clear) mid-stream aborts the engine request: its KV blocks are all free again and the
    scheduler forgets it, well before the 1,500-token answer could have finished on its own."""
    engine = engine_of(chatty_web)
    wait_engine_idle(engine, timeout=120)  # an earlier test's answer is over
    llm, aborted = engine.engine, []
    abort = llm.abort

    def recording_abort(request_id):  # the engine thread calls it for a request left mid-stream
        aborted.append((request_id, abort(request_id)))
        return aborted[-1][1]

    monkeypatch.setattr(llm, "abort", recording_abort)
    backend, heard = chatty_web._server.config.app.state.backend, []
    stop = backend.stop

    async def recording_stop(session):  # the button's handler reached the backend
        heard.append(session)
        await stop(session)

    monkeypatch.setattr(backend, "stop", recording_stop)
    for _ in range(3):
        aborted.clear(), heard.clear()
        page.goto(chatty_web.url)
        page.wait_for_selector("#message textarea")
        start_long_answer(page, f"A long answer, then {button}.")
        busy = engine.stats()
        (request_id,) = live_request_ids(engine)
        assert busy.num_running == 1 and busy.kv_blocks_free < busy.kv_blocks_total  # the answer holds KV blocks
        click_until_heard(page, f"#{button}", heard)
        idle = wait_engine_idle(engine, timeout=15)
        if aborted[:1] != [(request_id, False)]:
            break
        # the rambling answer ended on its own before the click reached the engine (it does, about one run in four
        # on a busy 2-core machine: random text can hold a stop string, where the detokenizer ends the request), so
        # nothing was left to abort: again; a bug that never finds a running request fails all three times
    # aborted while running (a finished request is not aborted). A click Gradio's frontend acts on (cancelling the
    # stream, so the server aborts the request) can still reach the backend's handler late; the next click's handler
    # then aborts the same id again and finds nothing: only the first abort finds it running
    assert aborted[0] == (request_id, True) and all(a == (request_id, False) for a in aborted[1:]), aborted
    assert live_request_ids(engine) == set()
    assert llm.block_manager.num_free == llm.block_manager.num_blocks == idle.kv_blocks_total
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web_ui_{button}_freed.png"), full_page=True)


# --------------------------------------------------------------------------- the uploaders' icons


@pytest.fixture(scope="module")
def video_web():
    with BackgroundServer(["web", "--model", "tiny-video", "--max-model-len", "1024"]) as s:
        yield s


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    import random

    from cogvlm2.tiny import shapes

    path = tmp_path_factory.mktemp("clip") / "shapes.mp4"
    shapes.write_video(shapes.render_video_frames(shapes.random_motion(random.Random(0))), path)
    return path


# Every visible icon (svg) and icon button of the uploader block `sel`: its box, and each box that clips it (the
# block, and any element between them whose overflow is not visible).
ICON_BOXES = """(sel) => {
  const root = document.querySelector(sel);
  const box = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  return [...root.querySelectorAll('svg, button')].filter((e) => e.checkVisibility()).map((e) => {
    const clips = [];
    for (let p = e.parentElement; p; p = p.parentElement) {
      if (p === root || getComputedStyle(p).overflow !== 'visible') clips.push([p.className.baseVal ?? p.className, box(p)]);
      if (p === root) break;
    }
    const name = e.getAttribute('aria-label') || e.getAttribute('title') || (e.className.baseVal ?? e.className);
    return {tag: e.tagName.toLowerCase(), name: name, box: box(e), clips: clips};
  });
}"""


def assert_icons_inside(page, selector: str) -> int:
    """Each icon of the uploader is drawn whole: not zero-size and inside every box that clips it. The count."""
    icons = page.evaluate(ICON_BOXES, selector)
    for icon in icons:
        left, top, right, bottom = icon["box"]
        assert right - left >= 4 and bottom - top >= 4, f"{selector} {icon['tag']} {icon['name']!r} is {icon['box']}"
        for name, (cl, ct, cr, cb) in icon["clips"]:
            assert cl - 0.5 <= left and ct - 0.5 <= top and right <= cr + 0.5 and bottom <= cb + 0.5, \
                f"{selector} {icon['tag']} {icon['name']!r} at {icon['box']} is clipped by {name!r} at {[cl, ct, cr, cb]}"
    assert sum(icon["tag"] == "svg" for icon in icons) >= 3  # the measurement saw the icons
    return len(icons)


@pytest.mark.parametrize("width", [1280, 700])
def test_the_video_uploaders_icons_are_not_clipped(video_web, page, clip_file, width):
    """Empty (drop zone + upload / webcam buttons) and with a clip loaded (player and edit buttons)."""
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(video_web.url)
    page.wait_for_selector("#video-input .source-selection button")
    assert page.locator("#image-input").count() == 0 or not page.locator("#image-input").is_visible()
    assert_icons_inside(page, "#video-input")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#video-input").screenshot(path=str(ARTIFACTS / f"web_ui_video_uploader_{width}.png"))
    page.locator("#video-input input[type=file]").set_input_files(str(clip_file))
    page.wait_for_selector("#video-input video")
    page.wait_for_selector("#video-input button[aria-label='Clear']")
    assert_icons_inside(page, "#video-input")
    page.screenshot(path=str(ARTIFACTS / f"web_ui_video_loaded_{width}.png"), full_page=True)


def test_the_image_uploaders_icons_are_not_clipped(web, page, image_file):
    page.goto(web.url)
    page.wait_for_selector("#image-input .source-selection button")
    assert_icons_inside(page, "#image-input")
    page.locator("#image-input input[type=file]").set_input_files(str(image_file))
    page.wait_for_selector("#image-input img")
    assert_icons_inside(page, "#image-input")
