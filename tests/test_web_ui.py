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

from cogvlm2.serving.background import BackgroundServer  # noqa: E402

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


def test_upload_image_and_chat_with_a_streamed_answer(web, page, image_file):
    page.goto(web.url)
    page.wait_for_selector("#message textarea")
    assert "random weights" in page.locator("#tiny-note").inner_text()  # the tiny model says so
    page.locator("#image-input input[type=file]").set_input_files(str(image_file))
    page.wait_for_selector("#image-input img")
    set_slider(page, "max-tokens", 160)
    seen = ask(page, "What shapes are in this picture?")
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert len(seen[-1]) > len(seen[0])  # it grew (rendered markdown, so not always prefix by prefix)
    assert "What shapes are in this picture?" in page.locator("#chatbot").inner_text()

    set_slider(page, "max-tokens", 24)
    second = ask(page, "And their colours?")  # multi-turn on the same image
    assert second[-1]
    assert page.locator("#chatbot").inner_text().count("?") >= 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui.png"), full_page=True)


def test_retry_and_clear(web, page):
    page.goto(web.url)
    page.wait_for_selector("#message textarea")
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
            assert "random weights" in page.locator("#tiny-note").inner_text()
            page.locator("#image-input input[type=file]").set_input_files(str(image_file))
            page.wait_for_selector("#image-input img")
            set_slider(page, "max-tokens", 40)
            seen = ask(page, "What is this?")
            assert seen and seen[-1]
