"""Read aloud and voice messages in a real browser (Debian chromium via playwright), against the
app with its real speech roles: Piper speaks, faster-whisper (tiny.en) hears."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.test_browser import ARGS, CHROMIUM

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make browser)")]
QUESTION = "Please describe the weather in Paris."
ANSWER = ("Paris is the capital of France. It lies on the river Seine, and it is known for its museums.\n\n"
          "```python\nprint('this code is never read aloud')\n```\n\nThat is all I know about it.")
READ = "#chat button[aria-label='Read aloud'], #chat button[aria-label='Stop reading aloud']"


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory):
    from tests.conftest import running_server

    with running_server(tmp_path_factory.mktemp("speech"), max_new_tokens="16", context_tokens="4096",
                        tts_backend="piper", asr_backend="faster-whisper") as srv:
        yield srv


@pytest.fixture(scope="module")
def page(say, speech_server, tmp_path_factory):
    """One page; its fake microphone says QUESTION after half a second, then is silent."""
    from playwright.sync_api import sync_playwright

    from engine.speech.audio import write_wav

    mic = np.concatenate([np.zeros(8000, np.float32), say(QUESTION), np.zeros(16000 * 8, np.float32)])
    wav = write_wav(tmp_path_factory.mktemp("mic") / "mic.wav", mic, 16000)
    store = speech_server.engine.store
    cid = store.create_conversation("Read me")
    store.add_turn(cid, "user", "Tell me about Paris")
    store.add_turn(cid, "assistant", ANSWER + '\n\n<span class="turn-meta">42 tokens</span>')
    store.add_turn(cid, "user", "And Lyon?")
    store.add_turn(cid, "assistant", "Lyon is known for its food. It lies where two rivers meet.")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS + [
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.goto(speech_server.url + "/", wait_until="load")
        page.locator("#conversations label").filter(has_text="Read me").click()
        page.locator("#chat").get_by_text("capital of France").wait_for(timeout=30_000)
        yield page
        browser.close()


def test_read_aloud_plays_the_answer_and_stops(page, tmp_path):
    button, other = page.locator(READ).first, page.locator(READ).last
    other.wait_for(timeout=30_000)
    assert page.locator(READ).count() == 2  # each answer has one; the questions none
    button.click()
    # the route's audio arrives and plays: the speakers get sound while the answer is still being made
    page.wait_for_function("() => window.omniReadAloud.stats.bytes > 0 && window.omniReadAloud.playing()",
                           timeout=30_000)
    page.wait_for_function("() => window.omniReadAloud.level() > 0.01", timeout=30_000)
    stats = page.evaluate("() => window.omniReadAloud.stats")
    assert stats["sampleRate"] == 22050 and stats["chunks"] >= 1
    assert "capital of France" in stats["text"] and "That is all I know" in stats["text"]
    assert "print" not in stats["text"] and "42 tokens" not in stats["text"]  # no code, no meta line
    assert button.get_attribute("aria-label") == "Stop reading aloud"
    page.screenshot(path=str(tmp_path / "reading.png"))
    button.click()  # the same button stops it
    page.wait_for_function("() => !window.omniReadAloud.playing() && window.omniReadAloud.level() === 0",
                           timeout=10_000)
    assert page.evaluate("() => window.omniReadAloud.stats.state") == "stopped"
    assert button.get_attribute("aria-label") == "Read aloud"

    button.click()
    page.wait_for_function("() => window.omniReadAloud.playing()", timeout=30_000)
    other.click()  # reading another answer stops the first
    page.wait_for_function("() => window.omniReadAloud.stats.text.startsWith('Lyon')", timeout=10_000)
    assert button.get_attribute("aria-label") == "Read aloud"
    assert other.get_attribute("aria-label") == "Stop reading aloud"
    page.wait_for_function("() => window.omniReadAloud.playing()", timeout=30_000)
    page.keyboard.press("Escape")  # and Esc stops it too
    page.wait_for_function("() => !window.omniReadAloud.playing()", timeout=10_000)
    assert other.get_attribute("aria-label") == "Read aloud"
    other.click()
    page.wait_for_function("() => window.omniReadAloud.playing()", timeout=30_000)
    page.locator("#stop").click()  # and so does the page's Stop
    page.wait_for_function("() => !window.omniReadAloud.playing()", timeout=10_000)
    assert page.evaluate("() => window.omniReadAloud.stats.requests") == 4
    assert not page.errors, page.errors


def test_read_aloud_says_why_when_there_is_no_voice(page, speech_server, monkeypatch):
    from dataclasses import replace

    from engine.config import TTSConfig
    from engine.roles import build_roles

    off = replace(speech_server.engine.config, tts=TTSConfig(backend="none"))
    monkeypatch.setitem(speech_server.engine.roles, "tts", build_roles(off)["tts"])
    button = page.locator(READ).last
    button.click()
    page.locator("#omni-toast").filter(has_text="set --tts-backend piper").wait_for(timeout=10_000)
    assert "speech synthesis is off" in button.get_attribute("title")
    assert not page.evaluate("() => window.omniReadAloud.playing()")


def test_voice_message_is_recorded_attached_sent_and_heard(page, speech_server, tmp_path):
    page.locator("#new-chat").click()
    page.locator("#chat").get_by_text("capital of France").wait_for(state="detached", timeout=30_000)
    mic = page.get_by_role("button", name="Record a voice message")
    page.evaluate("() => { window.omniReadAloud.limits.recordSeconds = 1; }")  # past its limit it stops by itself
    mic.click()
    page.locator("#omni-toast").filter(has_text="Voice messages stop at 0:01").wait_for(timeout=10_000)
    page.locator("#input .thumbnail-item").wait_for(timeout=30_000)
    page.get_by_role("button", name="Remove file").click()
    page.locator("#input .thumbnail-item").wait_for(state="detached", timeout=10_000)

    page.evaluate("() => { window.omniReadAloud.limits.recordSeconds = 300; }")
    mic.click()
    page.wait_for_function("() => window.omniReadAloud.recording()", timeout=10_000)
    stop = page.get_by_role("button", name="Stop recording and attach the voice message")  # the same button
    page.wait_for_function("() => window.omniReadAloud.recordedSeconds() > 3.5", timeout=20_000)
    page.screenshot(path=str(tmp_path / "recording.png"))
    assert "0:0" in page.locator("#voice-message").inner_text()  # how long, on the button
    stop.click()
    page.locator("#input .thumbnail-item").wait_for(timeout=30_000)  # in the message box, not sent yet
    assert not page.evaluate("() => window.omniReadAloud.recording()")
    page.screenshot(path=str(tmp_path / "attached.png"))
    page.locator("#input textarea").fill("Answer in one line")  # typed alongside the recording
    page.locator("#input textarea").press("Enter")
    page.locator("#chat").get_by_text("Answer in one line").wait_for(timeout=60_000)
    page.locator("#perception-panel").locator("button").first.click()
    page.locator("#seen-facts").get_by_text("weather", exact=False).wait_for(timeout=120_000)
    store = speech_server.engine.store
    cid = next(c["id"] for c in store.list_conversations() if c["title"] != "Read me")
    user = store.turns(cid)[0]
    assert [m.kind for m in user.media] == ["audio"] and user.media[0].mime == "audio/webm"
    assert user.content.startswith("Answer in one line")  # typed alongside it; then what the model reads of it:
    heard = user.content.partition(f"[{user.media[0].name}, transcribed:")[2].lower()
    assert "weather" in heard and "paris" in heard, heard
    page.screenshot(path=str(tmp_path / "voice-message-sent.png"), full_page=True)
    assert not page.errors, page.errors
