"""A real browser (Debian chromium via playwright) against the running app."""
from __future__ import annotations

import shutil

import pytest
from engine.session import Session

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make browser)")]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    fake_mic = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # a beep, no dialog
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS + fake_mic)
    yield b
    b.close()


def bot_text(page) -> str:
    bots = page.locator("#chat .message-row.bot-row, #chat .bot")
    return bots.last.inner_text() if bots.count() else ""


def test_type_stream_stop_and_screenshot(browser, long_server, tmp_path, answers):
    seen = answers(long_server.engine)
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
    assert seen[-1]["finish_reason"] == "cancelled"
    # the conversation is listed in the sidebar under its first message
    assert page.locator("#conversations").get_by_text("Hello from the browser").count() == 1
    page.close()


def test_voice_mode_question_answer_and_interrupt(playwright, say, tmp_path):
    """Fake microphone: a spoken question, silence, then speech over the answer."""
    import numpy as np

    from engine.speech.audio import write_wav
    from tests.conftest import running_server

    gap = np.zeros(16000 * 4, np.float32)
    # (7 s before talking over the answer: on a loaded 2-core machine its first sentence can take 4 s to sound)
    mic = np.concatenate([np.zeros(8000, np.float32), say("What is the capital of France?"),
                          np.zeros(16000 * 7, np.float32), say("Please stop talking and tell me about Berlin."), gap])
    wav = write_wav(tmp_path / "mic.wav", mic, 16000)
    args = ARGS + ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                   f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]
    speech = {"asr_backend": "faster-whisper", "tts_backend": "piper", "vad.backend": "silero"}
    with running_server(tmp_path / "data", max_new_tokens="300", context_tokens="4096", **speech) as srv:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(srv.url + "/", wait_until="load")
        page.locator("#voice-btn").wait_for(timeout=30_000)
        page.locator("#voice-btn").click()
        page.wait_for_function("() => window.omniVoice.stats.transcripts.some(t => /capital of france/i.test(t))",
                               timeout=60_000)
        page.wait_for_function("() => window.omniVoice.stats.audioChunks > 0 && window.omniVoice.stats.answer",
                               timeout=60_000)
        page.wait_for_function("() => window.omniVoice.stats.states.includes('interrupted')", timeout=60_000)
        page.wait_for_function("() => window.omniVoice.stats.transcripts.some(t => /berlin/i.test(t))",
                               timeout=60_000)
        page.get_by_text("capital of France").first.wait_for(timeout=30_000)  # in the chat history too
        page.screenshot(path=str(tmp_path / "voice.png"), full_page=True)
        page.evaluate("() => window.omniVoice.stop()")
        browser.close()
        turns = srv.engine.store.turns(srv.engine.store.list_conversations()[-1]["id"])
        assert turns[0].content.lower().startswith("what is the capital of france")
        assert turns[1].status == "interrupted" and turns[1].media  # the spoken answer is kept


# --- the sidebar, the side panels and a phone-sized screen, on one server and one page ---

@pytest.fixture(scope="module")
def chats(server, tmp_path_factory):
    """Two conversations made through the engine: one with a picture cropped, one plain."""
    from PIL import Image

    from engine.events import CancelToken
    from engine.session import Turn

    photo = tmp_path_factory.mktemp("photos") / "lighthouse.png"
    Image.new("RGB", (400, 200), (20, 60, 160)).save(photo)
    ids = {}
    for title, turn in (("crop", Turn("crop it to a square", (str(photo),))), ("plain", Turn("just words"))):
        session = Session(server.engine, None)
        list(session.submit(turn, CancelToken()))
        ids[title] = session.id
    return ids


@pytest.fixture(scope="module")
def page(browser, server, chats):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    _open(page, server.url)
    for panel in ("#media-panel", "#perception-panel", "#router-panel", "#voice-settings"):
        page.locator(panel).locator("button").first.click()
    yield page
    page.close()


def _open(page, url: str) -> None:
    page.goto(url + "/", wait_until="load")
    page.locator("#conversations label").first.wait_for(timeout=30_000)  # filled by demo.load


def _pick(page, title: str) -> None:
    page.locator("#conversations label").filter(has_text=title).click()
    page.locator("#chat").get_by_text(title).first.wait_for(timeout=30_000)


def _toast(page, text: str) -> None:
    page.locator(".toast-body").filter(has_text=text).first.wait_for(timeout=30_000)
    page.locator(".toast-close").first.click()


def test_side_panels_show_the_open_conversation(page, server, tmp_path):
    _pick(page, "crop it to a square")
    page.locator("#gallery img").first.wait_for(timeout=30_000)
    page.locator("#seen img").first.wait_for(timeout=30_000)
    assert "lighthouse.png" in page.locator("#seen-facts").inner_text()
    downloads = page.locator("#files a[download]").evaluate_all("links => links.map(a => a.download)")
    assert "lighthouse.png" in downloads and "lighthouse-crop.png" in downloads, downloads  # named, not by hash
    fit = page.locator("#seen img").first.evaluate("img => getComputedStyle(img).objectFit")
    picture, frame = page.locator("#seen img").first.bounding_box(), page.locator("#seen").bounding_box()
    assert fit == "contain" and picture["y"] + picture["height"] <= frame["y"] + frame["height"]  # the whole picture
    page.screenshot(path=str(tmp_path / "panels-media.png"), full_page=True)

    _pick(page, "just words")
    page.wait_for_function("() => !document.querySelector('#gallery img') && !document.querySelector('#seen img')",
                           timeout=30_000)
    assert "Nothing looked at yet" in page.locator("#seen-facts").inner_text()
    assert page.locator("#files a[download]").count() == 0
    page.screenshot(path=str(tmp_path / "panels-plain.png"), full_page=True)

    _open(page, server.url)  # a reload: no conversation open, nothing of the last one shown
    for panel in ("#media-panel", "#perception-panel", "#router-panel", "#voice-settings"):
        page.locator(panel).locator("button").first.click()
    page.locator("#seen-facts").get_by_text("Nothing looked at yet").wait_for(timeout=30_000)
    assert page.locator("#gallery img").count() == 0


def _delete(page, accept: bool) -> None:
    """Click Delete and answer the browser's question. While the last Delete is still being
    handled, Gradio ignores another click on it (its trigger_mode "once"; slow on a loaded
    machine), so it is clicked again until the question shows."""
    asked = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.on("dialog", answer)
    try:
        for _ in range(30):
            page.locator("#delete").click()
            for _ in range(20):
                if asked:
                    return
                page.wait_for_timeout(100)
        raise AssertionError("Delete never asked")
    finally:
        page.remove_listener("dialog", answer)


def test_sidebar_and_settings_errors_are_readable(page, server, chats):
    _pick(page, "just words")
    page.locator("#title textarea, #title input").first.fill("   ")
    page.locator("#rename").click()
    _toast(page, "cannot be empty")
    assert page.locator("#conversations label").count() == 2  # the list is intact, no "Error" box
    assert page.locator("#conversations").get_by_text("Error", exact=True).count() == 0

    page.locator("#new-chat").click()
    page.locator("#rename").click()
    _toast(page, "Open a conversation first")
    assert page.locator("#conversations label").count() == 2

    pick = page.locator("#voice-pick input")
    pick.fill("no-such-voice")
    pick.press("Enter")
    page.locator("#voice-apply").click()
    _toast(page, "joe-us")  # the message lists the voices that exist
    assert server.engine.config.tts.voice != "no-such-voice"
    pick.fill("joe-us")
    pick.press("Enter")
    page.locator("#voice-apply").click()
    _toast(page, "Voice set to joe-us")

    _pick(page, "just words")
    _delete(page, accept=False)
    page.locator("#conversations label").filter(has_text="just words").wait_for(timeout=30_000)
    assert server.engine.store.get_conversation(chats["plain"]) is not None  # cancelled: nothing deleted
    _delete(page, accept=True)
    page.wait_for_function("() => ![...document.querySelectorAll('#conversations label')]"
                           ".some(l => l.innerText.includes('just words'))", timeout=30_000)
    assert server.engine.store.get_conversation(chats["plain"]) is None
    assert not page.errors, page.errors


def test_voice_mode_turned_off_at_once_leaves_no_error(page):
    """Off while the socket is still connecting: nothing may run on after stop()."""
    page.evaluate("async () => { await window.omniVoice.start(); window.omniVoice.stop(); }")
    page.wait_for_timeout(1500)  # room for a late socket open or microphone frame to fail
    assert page.locator("#voice-status").inner_text() == "Voice mode is off."
    assert not page.errors, page.errors


def test_phone_screen_sidebar_starts_closed_and_closes_after_a_pick(browser, server, chats, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    _open(page, server.url)
    page.wait_for_function("() => !document.querySelector('.sidebar.open')", timeout=30_000)
    assert page.locator("#input").bounding_box()["width"] >= 300
    page.screenshot(path=str(tmp_path / "phone.png"))
    page.locator(".sidebar .toggle-button").click()
    page.locator(".sidebar.open").wait_for(timeout=30_000)
    _pick(page, "crop it to a square")
    page.wait_for_function("() => !document.querySelector('.sidebar.open')", timeout=30_000)
    page.screenshot(path=str(tmp_path / "phone-picked.png"))
    page.close()
