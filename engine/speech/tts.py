"""Text to speech: Piper voices that ship in packages, streamed sentence by sentence.

`SentenceBuffer` turns the LLM's streamed text into speakable pieces (the
first may be cut at a clause boundary so the first audio comes sooner);
`SpeechStream` synthesizes them on a worker thread while the LLM keeps
decoding, and stops within one piece on cancel.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.config import TTSConfig
from engine.errors import Unavailable
from engine.events import AudioChunk, CancelToken
from engine.speech.audio import to_int16


class TTS(ABC):
    name: str = ""
    sample_rate: int = 22050
    #: it speaks the LLM's own answer from the thinker's states (`speak(trace)`: the omni talker),
    #: not given text
    from_trace: bool = False

    @abstractmethod
    def synthesize(self, text: str, rate: float = 1.0, cancel: CancelToken | None = None) -> Iterator[np.ndarray]:
        """Mono float32 chunks, one per sentence; nothing for blank text."""


class PiperTTS(TTS):
    """`variation` scales Piper's sampling noise (1.0: the voice's own prosody;
    0.0: deterministic, the same text gives the same samples)."""

    def __init__(self, voice: str, variation: float = 1.0) -> None:
        self.variation = variation
        from engine.packaged import names, resolve_named

        path = resolve_named("tts", voice)
        if path is None:
            path = Path(voice).expanduser()
            if path.suffix != ".onnx" or not path.exists():
                raise Unavailable(f"no voice {voice!r}",
                                  f"set --voice to one of {', '.join(names('tts'))} or the path of a Piper .onnx voice")
            if not Path(str(path) + ".json").exists():
                raise Unavailable(f"{path.name} has no {path.name}.json beside it", "copy the voice's config next to it")
        from piper import PiperVoice

        self.voice = PiperVoice.load(str(path))
        self.sample_rate = self.voice.config.sample_rate
        self.name = f"Piper {path.stem}"
        self._lock = threading.Lock()

    def synthesize(self, text, rate=1.0, cancel=None):
        from piper import SynthesisConfig

        if not text.strip():
            return
        noise = {} if self.variation == 1.0 else {
            "noise_scale": self.voice.config.noise_scale * self.variation,
            "noise_w_scale": self.voice.config.noise_w_scale * self.variation}
        config = SynthesisConfig(length_scale=1.0 / max(0.5, min(2.0, rate)), **noise)
        for piece in bounded(text):
            with self._lock:
                for chunk in self.voice.synthesize(piece, syn_config=config):
                    if cancel is not None and cancel.cancelled:
                        return
                    yield chunk.audio_float_array.astype(np.float32)


MAX_PIECE = 250  # characters Piper is given at once: one chunk, synthesized whole before it is heard or cancelled


def bounded(text: str, limit: int = MAX_PIECE) -> Iterator[str]:
    """The text in pieces of at most `limit` characters: cut after the last sentence end in reach,
    else a run with none (a list, a pasted log, 4000 characters of one word) at its last space, else
    at the limit; so the first audio of any text comes within one piece's synthesis."""
    while len(text) > limit:
        window = text[:limit]
        ends = [m.end() for m in _END.finditer(window)]
        cut = ends[-1] if ends else (window.rfind(" ") + 1 or limit)
        yield text[:cut]
        text = text[cut:]
    if text.strip():
        yield text


def load_tts(cfg: TTSConfig) -> TTS:
    if cfg.backend == "none":
        raise Unavailable("speech synthesis is off", "set --tts-backend piper")
    return PiperTTS(cfg.voice)


_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|\n+")
_ABBREV = {"dr", "mr", "mrs", "ms", "st", "vs", "etc", "e.g", "i.e", "no", "fig"}
_CLAUSE = re.compile(r"[,;:—–](?=\s)")
_MARKUP = re.compile(r"[*#`_~>|]|^\s*[-•]\s+", re.M)


class SentenceBuffer:
    """Streamed text in, complete speakable sentences out.

    With `first_clause_chars` > 0 the first piece comes early: at the first
    clause boundary past that many characters, or at a word boundary once
    twice that many have arrived with no punctuation."""

    def __init__(self, first_clause_chars: int = 0) -> None:
        self.text, self.first_clause_chars, self.emitted = "", first_clause_chars, 0

    def push(self, delta: str) -> list[str]:
        self.text += delta
        out = []
        while True:
            cut = _sentence_end(self.text)
            if self.emitted == 0 and self.first_clause_chars:
                clause = [m.end() for m in _CLAUSE.finditer(self.text) if m.end() >= self.first_clause_chars]
                if clause and (cut is None or clause[0] < cut):
                    cut = clause[0]
                # no punctuation yet: start speaking at a word boundary rather than wait for it
                if cut is None and len(self.text) >= 2 * self.first_clause_chars and " " in self.text.strip():
                    cut = self.text.rstrip().rfind(" ") + 1
            if cut is None:
                return out
            piece, self.text = _clean(self.text[:cut]), self.text[cut:]
            if piece:
                out.append(piece)
                self.emitted += 1

    def flush(self) -> str:
        piece, self.text = _clean(self.text), ""
        return piece


def _sentence_end(text: str) -> int | None:
    """Index just past the first sentence end, skipping abbreviations and initials."""
    for match in _END.finditer(text):
        if match.group().startswith("."):
            word = text[:match.start()].rsplit(None, 1)[-1].lower() if text[:match.start()].strip() else ""
            if word in _ABBREV or (len(word) == 1 and word.isalpha()):
                continue
        return match.end()
    return None


def _clean(text: str) -> str:
    return " ".join(_MARKUP.sub(" ", text).split())


class SpeechStream:
    """Speak streamed text on a worker thread; AudioChunk events come out as they are made."""

    def __init__(self, tts: TTS, rate: float = 1.0, cancel: CancelToken | None = None,
                 first_clause_chars: int = 0) -> None:
        self.tts, self.rate, self.cancel_token = tts, rate, cancel or CancelToken()
        self.buffer = SentenceBuffer(first_clause_chars)
        self.first_audio_at: float | None = None
        self._pieces: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="tts", daemon=True)
        self._worker.start()

    def push(self, delta: str) -> None:
        for piece in self.buffer.push(delta):
            self._pieces.put(piece)

    def close(self) -> None:
        if rest := self.buffer.flush():
            self._pieces.put(rest)
        self._pieces.put(None)

    def cancel(self) -> None:
        self.cancel_token.cancel("speech cancelled")
        self._pieces.put(None)

    def _run(self) -> None:
        try:
            while (piece := self._pieces.get()) is not None and not self.cancel_token.cancelled:
                for audio in self.tts.synthesize(piece, self.rate, self.cancel_token):
                    self.first_audio_at = self.first_audio_at or time.monotonic()
                    self._out.put(AudioChunk(to_int16(audio).tobytes(), self.tts.sample_rate))
        except Exception as exc:  # surface to the consumer, never hang it
            self._out.put(exc)
        finally:
            self._out.put(None)

    def _take(self, item):
        if isinstance(item, Exception):
            raise RuntimeError(f"speech synthesis failed: {item}") from item
        return item

    def poll(self) -> list[AudioChunk]:
        """Chunks ready now, without waiting."""
        out = []
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return out
            if item is None:
                self._out.put(None)  # keep the end marker for events()
                return out
            if not self.cancel_token.cancelled:
                out.append(self._take(item))

    def events(self, timeout: float | None = None) -> Iterator[AudioChunk]:
        """Every remaining chunk until the stream is closed and drained (or cancelled)."""
        while True:
            if self.cancel_token.cancelled:
                self._pieces.put(None)
                return
            try:
                item = self._out.get(timeout=0.05 if timeout is None else timeout)
            except queue.Empty:
                if timeout is not None:
                    return
                continue
            if item is None:
                return
            if not self.cancel_token.cancelled:
                yield self._take(item)

    __iter__ = events
