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
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
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


def test_voice_mode_question_answer_and_interrupt(playwright, say, tmp_path):
    """Fake microphone: a spoken question, silence, then speech over the answer."""
    import numpy as np

    from engine.speech.audio import write_wav
    from tests.conftest import running_server

    gap = np.zeros(16000 * 4, np.float32)
    mic = np.concatenate([np.zeros(8000, np.float32), say("What is the capital of France?"), gap,
                          say("Please stop talking and tell me about Berlin."), gap])
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
