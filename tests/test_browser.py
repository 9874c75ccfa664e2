"""A real browser (Debian chromium via playwright) against the running app."""
from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make browser)")]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def bot_text(page) -> str:
    bots = page.locator("#chat .message-row.bot-row, #chat .bot")
    return bots.last.inner_text() if bots.count() else ""


def test_type_stream_stop_and_screenshot(browser, long_server, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(long_server.url + "/", wait_until="load")
    box = page.locator("#input textarea")
    box.wait_for(timeout=30_000)
    box.fill("Hello from the browser")
    box.press("Enter")
    page.get_by_text("Hello from the browser").first.wait_for(timeout=30_000)
    # streamed: the answer grows while we watch
    page.wait_for_function("() => { const b = document.querySelectorAll('#chat .bot'); "
                           "return b.length && b[b.length-1].innerText.trim().length > 5; }", timeout=30_000)
    first = len(bot_text(page))
    page.wait_for_function(f"() => {{ const b = document.querySelectorAll('#chat .bot'); "
                           f"return b[b.length-1].innerText.length > {first}; }}", timeout=30_000)
    page.locator("#stop").click()
    page.get_by_text("interrupted").first.wait_for(timeout=30_000)
    shot = tmp_path / "chat-stopped.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert long_server.engine.last_usage["finish_reason"] == "cancelled"
    # the conversation is listed in the sidebar under its first message
    assert page.locator("#conversations").get_by_text("Hello from the browser").count() == 1
    page.close()
