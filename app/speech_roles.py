"""The speech roles as the API uses them: a voice by name (OpenAI's names included) and an
uploaded audio file decoded to Whisper's 16 kHz within a duration limit. A leaf module (it
imports only engine), shared by app/audio_api.py, app/chat_audio.py and app/realtime.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import Unavailable

MAX_AUDIO_S = 30 * 60  # longer uploads are refused before decoding (a transcript of 30 min takes minutes on CPU)
BLOCK_S = 10  # decode this many seconds of an upload at a time
# OpenAI's voice names: apps written for OpenAI send one of these; they speak in the configured voice
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


def decode_16k(path: Path, max_s: float = MAX_AUDIO_S, name: str | None = None) -> np.ndarray:
    """A checked audio file (any container engine.speech.decode reads: WAV, FLAC, OGG/Opus, MP3,
    M4A/AAC, WebM/Opus) -> mono float32 at 16 kHz, read BLOCK_S seconds at a time. InputError,
    naming the file as `name`, when it is longer than `max_s` or cannot be decoded."""
    from engine.speech import decode
    from engine.speech.audio import WHISPER_RATE

    return decode.decode(path, WHISPER_RATE, name=name, max_s=max_s, block_s=BLOCK_S)


_VOICES: dict[str, object] = {}  # other packaged voices than the configured one, loaded once each


def voices(engine) -> list[str]:
    from engine.packaged import names

    return sorted({engine.config.tts.voice, *names("tts")}) + list(OPENAI_VOICES)


def pick_voice(engine, voice: str):
    """The TTS for a voice name; ValueError listing the voices; Unavailable when speech is off."""
    from engine.packaged import names
    from engine.speech.tts import PiperTTS

    if voice and voice not in voices(engine):
        raise ValueError(f"unknown voice {voice[:40]!r}; choose one of {', '.join(voices(engine))}")
    if not voice or voice in OPENAI_VOICES or voice == engine.config.tts.voice:
        tts = engine.roles["tts"].get()
    elif voice in names("tts"):
        if voice not in _VOICES:
            if len(_VOICES) >= 4:
                _VOICES.pop(next(iter(_VOICES)))
            _VOICES[voice] = PiperTTS(voice)
        tts = _VOICES[voice]
    if tts.from_trace:
        raise Unavailable(f"{tts.name or 'this voice'} speaks answers, not given text",
                          "set --tts-backend piper for /v1/audio/speech")
    return tts
