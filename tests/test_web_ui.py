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
