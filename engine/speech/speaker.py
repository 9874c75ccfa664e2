"""Speaking an answer: a turn's voice, which keeps the audio it made.

`speaker_for(engine, cancel)` -> (a Speaker, None) or (None, Notice saying why
not). Two kinds, one interface (push text, yield ready audio, finish, store):
- `TextSpeaker`: a text-to-speech voice (engine/speech/tts.py) speaks the
  answer sentence by sentence while it is written;
- `TalkerSpeaker`: the omni model's own talker speaks it once the thinker has
  finished, from the thinker's hidden states (filled into `trace` during the
  answer), not from text.
The audio is stored with the answer (a WAV marked `spoken`), so it can be replayed.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from engine import media as media_mod
from engine.errors import Unavailable
from engine.events import AudioChunk, CancelToken, Notice
from generators.base import Cancelled


class Speaker:
    """The audio of one answer, kept as it is made."""

    trace: list | None = None  # the thinker's states the voice speaks from (the talker only)

    def __init__(self, sample_rate: int) -> None:
        self.rate, self.started, self.first = sample_rate, time.monotonic(), None
        self.pcm: list[bytes] = []

    def push(self, text: str) -> None:
        """More of the answer's text (a voice that speaks from the thinker's states ignores it)."""

    def ready(self) -> Iterator[AudioChunk]:
        """The audio made so far, while the answer is still being written."""
        return iter(())

    def finish(self) -> Iterator[AudioChunk]:
        """The rest of the audio, once the answer is written."""
        return iter(())

    def _keep(self, chunks) -> Iterator[AudioChunk]:
        for chunk in chunks:
            self.first = self.first or time.monotonic()
            self.pcm.append(chunk.pcm)
            yield chunk

    def timings(self) -> dict:
        samples = sum(len(p) for p in self.pcm) // 2
        return {"first_audio_ms": round((self.first - self.started) * 1000, 1) if self.first else None,
                "audio_s": round(samples / self.rate, 3)}

    def store(self, engine):
        """The spoken answer as a WAV in the media store (None: nothing was said)."""
        if not self.pcm:
            return None
        from engine.speech.audio import write_wav

        audio = np.frombuffer(b"".join(self.pcm), dtype="<i2").astype(np.float32) / 32767.0
        with tempfile.TemporaryDirectory() as tmp:
            path = write_wav(Path(tmp) / "answer.wav", audio, self.rate)
            return replace(media_mod.ingest(path, engine.media_dir, 1 << 31, "answer.wav"), spoken=True)


class TextSpeaker(Speaker):
    """Speaks the answer while it is written (engine/speech/tts.SpeechStream)."""

    def __init__(self, tts, cfg, cancel: CancelToken) -> None:
        from engine.speech.tts import SpeechStream

        super().__init__(tts.sample_rate)
        self.stream = SpeechStream(tts, rate=cfg.rate, cancel=cancel, first_clause_chars=cfg.first_piece_chars)

    def push(self, text: str) -> None:
        self.stream.push(text)

    def ready(self) -> Iterator[AudioChunk]:
        return self._keep(self.stream.poll())

    def finish(self) -> Iterator[AudioChunk]:
        self.stream.close()
        return self._keep(self.stream.events())

    def timings(self) -> dict:
        self.first = self.stream.first_audio_at or self.first  # (when the voice made it, not when it was sent)
        return super().timings()


class TalkerSpeaker(Speaker):
    """The answer spoken by the omni model's talker once the thinker has finished (a tool
    turn's short reply has no trace: it is shown, not spoken)."""

    def __init__(self, voice, cancel: CancelToken, lock) -> None:
        super().__init__(voice.sample_rate)
        self.voice, self.cancel, self.lock = voice, cancel, lock
        self.trace = []

    def finish(self) -> Iterator[AudioChunk]:
        if not self.trace or self.cancel.cancelled:
            return iter(())
        try:
            wav = self.voice.speak(self.trace[-1], self.cancel, self.lock)
        except Cancelled:
            return iter(())
        pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        return self._keep([AudioChunk(pcm, self.rate)] if len(wav) else [])

    def timings(self) -> dict:
        return {**super().timings(), "voice": "talker"}


def speaker_for(engine, cancel: CancelToken) -> tuple[Speaker | None, Notice | None]:
    """The voice for this turn's answer, or why there is none."""
    try:
        tts = engine.roles["tts"].get()
    except Unavailable as exc:
        return None, Notice(f"Not speaking this answer: speech synthesis is {exc}")
    if tts.from_trace:  # the omni LLM's own talker (engine/speech/talker.py)
        return TalkerSpeaker(tts, cancel, engine.model_lock), None
    return TextSpeaker(tts, engine.config.tts, cancel), None
