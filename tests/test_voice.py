"""Voice: spoken turns through the session, the CLI, and the live VoiceSession
(real Silero + Whisper + Piper; the tiny LLM answers)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.engine import Engine
from engine.events import AudioChunk, Done, TextDelta, Transcript, VoiceState
from engine.session import Session, Turn
from engine.speech.audio import write_wav

ROOT = Path(__file__).resolve().parents[1]
SPEECH = {"asr_backend": "faster-whisper", "tts_backend": "piper", "vad.backend": "silero"}


@pytest.fixture
def voice_engine(tmp_path):
    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path / "data"), **SPEECH}, env={}))
    yield eng
    eng.close()


def test_spoken_question_is_transcribed_answered_and_spoken(voice_engine, say, tmp_path):
    wav = write_wav(tmp_path / "question.wav", say("What is the capital of France?"), 16000)
    session = Session(voice_engine)
    events = list(session.submit(Turn(attachments=(str(wav),), speak=True, max_new_tokens=30)))
    heard = [e for e in events if isinstance(e, Transcript)]
    assert heard and "capital of france" in heard[0].text.lower()
    assert any(isinstance(e, TextDelta) for e in events) and any(isinstance(e, AudioChunk) for e in events)
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    assert first_audio < len(events) - 2  # audio streamed before the end of the turn
    user, answer = voice_engine.store.turns(session.id)
    assert "capital of France" in user.content and user.media[0].kind == "audio"
    assert answer.media and answer.media[0].name == "answer.wav"  # the spoken answer can be replayed
    assert answer.meta["speech"]["audio_s"] > 0.5


def test_audio_with_typed_text_adds_the_transcript(voice_engine, say, tmp_path):
    wav = write_wav(tmp_path / "memo.wav", say("Remember to buy milk and eggs tomorrow."), 16000)
    session = Session(voice_engine)
    list(session.submit(Turn("Summarise my memo", (str(wav),))))
    user = voice_engine.store.turns(session.id)[0]
    assert user.content.startswith("Summarise my memo") and "milk" in user.content.lower()


def test_silent_recording_says_no_words(voice_engine, tmp_path):
    wav = write_wav(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    events = list(Session(voice_engine).submit(Turn(attachments=(str(wav),))))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "couldn't make out any words" in text


def test_cli_speak_to_writes_the_spoken_answer(say, tmp_path, tiny_cli):
    wav = write_wav(tmp_path / "q.wav", say("Tell me a joke."), 16000)
    out_wav = tmp_path / "answer.wav"
    flags = [f"--set={k if '.' in k else k.replace('_', '.', 1) if k != 'asr_backend' else 'asr.backend'}={v}"
             for k, v in SPEECH.items()]
    cmd = [sys.executable, "run_app.py", "chat", "--profile", "tiny", *tiny_cli(tmp_path / "d"), "--json",
           "--attach", str(wav), "--speak-to", str(out_wav), *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "transcript" and "joke" in events[0]["text"].lower()
    assert "audio_chunk" in kinds and kinds[-1] == "done"
    media = [e for e in events if e["type"] == "media_result"]
    assert media and media[0]["kind"] == "audio" and media[0]["meta"]["duration_s"] > 0.3
    import soundfile as sf

    assert sf.info(str(out_wav)).duration == pytest.approx(media[0]["meta"]["duration_s"], abs=0.01)


def _feed(session, audio, rate=16000, step=320):
    for i in range(0, len(audio), step):
        session.feed(audio[i:i + step], rate)


def _wait(pred, limit=60.0):
    deadline = time.monotonic() + limit
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_voice_session_turn_then_barge_in(tmp_path, say):
    from engine.voice_session import VoiceSession

    # 80 tokens of the tiny model's text are ~8 s of speech: the barge-in below lands well inside
    # it (it takes under a second), and each answer is synthesised in full in a third of 200's time
    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "max_new_tokens": "80", **SPEECH},
                             env={}))
    got: list = []
    session = VoiceSession(eng, got.append)
    try:
        question = np.concatenate([say("What is the capital of France?"), np.zeros(16000, np.float32)])
        _feed(session, (question * 32767).astype(np.int16).tobytes(), 16000)  # int16 bytes, as the browser sends
        assert _wait(lambda: any(isinstance(e, AudioChunk) for e in got)), [type(e).__name__ for e in got]
        assert any(isinstance(e, Transcript) and "france" in e.text.lower() for e in got)
        # the answer is long; talk over it (48 kHz, like a browser): audio stops and the turn is cancelled
        silence = np.zeros(320, np.float32)
        while session.pacer.play_until - time.monotonic() < 0.1:
            session.feed(silence, 16000)
        barge = say("Stop, tell me about Berlin instead.", rate=48000)
        _feed(session, barge, 48000, step=960)
        assert _wait(lambda: "audio_stopped" in session.marks)
        assert not session.pacer.pending
        states = [e.state for e in got if isinstance(e, VoiceState)]
        assert "interrupted" in states and states.index("speaking") < states.index("interrupted")
        _feed(session, np.zeros(16000, np.float32))
        assert _wait(lambda: sum(isinstance(e, Done) for e in got) >= 2)
        turns = eng.store.turns(session.conversation_id)
        assert turns[1].status == "interrupted" and "berlin" in turns[2].content.lower()
    finally:
        session.close()
        eng.close()


def test_pause_mid_sentence_drafts_an_answer_then_drops_it(tmp_path, say):
    """A pause longer than speculate_ms but shorter than end_silence_ms: the answer
    prepared at the pause is dropped unseen and unstored; the whole sentence is one turn."""
    from engine.voice_session import VoiceSession

    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "max_new_tokens": "20", **SPEECH},
                             env={}))
    got: list = []
    session = VoiceSession(eng, got.append)
    try:
        gap = np.zeros(int(16000 * 0.33), np.float32)
        question = np.concatenate([say("Tell me about the weather"), gap, say("in Paris tomorrow."),
                                   np.zeros(16000, np.float32)])
        _feed(session, question)
        assert _wait(lambda: any(isinstance(e, Done) for e in got)), [type(e).__name__ for e in got]
        assert "speculated" in session.marks
        heard = [e.text.lower() for e in got if isinstance(e, Transcript)]
        assert len(heard) == 1 and "weather" in heard[0] and "paris" in heard[0], heard
        turns = eng.store.turns(session.conversation_id)
        assert [t.role for t in turns] == ["user", "assistant"] and "paris" in turns[0].content.lower()
        assert sum(isinstance(e, Done) for e in got) == 1
    finally:
        session.close()
        eng.close()
