"""Speech to text: Whisper on weights that ship in packages.

Two backends behind one contract: faster-whisper (CTranslate2, int8, the
fast CPU path and the default) and openai-whisper (the `whisper` package),
which needs a `.pt` checkpoint. Input is mono float32 at 16 kHz (see
audio.prepare); silence and near-empty audio give an empty transcript
instead of Whisper's hallucinated "Thank you."
"""
from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import ASRConfig
from engine.errors import Unavailable
from engine.speech.audio import WHISPER_RATE, rms_db

SILENCE_DB = -50.0  # quieter than this throughout is silence
MIN_SECONDS = 0.1


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    segments: tuple[Segment, ...] = ()
    duration_s: float = 0.0


class ASR(ABC):
    name: str = ""
    multilingual: bool = False

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        audio = np.asarray(audio, np.float32)
        duration = len(audio) / WHISPER_RATE
        if duration < MIN_SECONDS or rms_db(audio) < SILENCE_DB:
            return Transcript("", language or ("" if self.multilingual else "en"), (), duration)
        return self._transcribe(audio, language if self.multilingual else "en", duration)

    @abstractmethod
    def _transcribe(self, audio: np.ndarray, language: str | None, duration: float) -> Transcript:
        ...


def _model_path(model: str) -> Path:
    from engine.packaged import names, resolve_named

    path = resolve_named("asr", model)
    if path is None:
        path = Path(model).expanduser()
        if not path.exists():
            raise Unavailable(f"no speech recognition model {model!r}",
                              f"set --asr to one of {', '.join(names('asr'))} or a local model path")
    return path


class FasterWhisperASR(ASR):
    def __init__(self, model: str) -> None:
        path = _model_path(model)
        if not (path / "model.bin").exists():
            raise Unavailable(f"{path} is not a CTranslate2 Whisper model (no model.bin)",
                              "point --asr at a faster-whisper model directory")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 2,
                                  local_files_only=True)
        self.multilingual = bool(self.model.model.is_multilingual)
        self.name = f"faster-whisper {model if '/' not in model else path.name}"
        self._lock = threading.Lock()

    def _transcribe(self, audio, language, duration):
        with self._lock:
            segments, info = self.model.transcribe(audio, language=language, beam_size=1, vad_filter=False,
                                                   condition_on_previous_text=False, without_timestamps=False)
            segs = tuple(Segment(round(s.start, 2), round(min(s.end, duration), 2), s.text.strip()) for s in segments)
        return Transcript(" ".join(s.text for s in segs).strip(), info.language, segs, duration)


class OpenAIWhisperASR(ASR):
    """openai-whisper on a local `.pt` checkpoint (`pip install --no-deps openai-whisper`)."""

    def __init__(self, model: str) -> None:
        path = Path(model).expanduser()
        if path.suffix != ".pt" or not path.exists():
            raise Unavailable("openai-whisper needs a .pt checkpoint and none ships in a package",
                              "set --asr /path/to/model.pt, or use --asr-backend faster-whisper (packaged)")
        try:
            import whisper
        except ImportError:
            raise Unavailable("the whisper package is not installed",
                              "pip install --no-deps openai-whisper tiktoken numba more-itertools tqdm") from None
        self.model = whisper.load_model(str(path), device="cpu")
        self.multilingual = bool(self.model.is_multilingual)
        self.name = f"openai-whisper {path.stem}"
        self._lock = threading.Lock()

    def _transcribe(self, audio, language, duration):
        with self._lock:
            out = self.model.transcribe(audio, language=language, fp16=False, temperature=0.0,
                                        condition_on_previous_text=False)
        segs = tuple(Segment(round(s["start"], 2), round(s["end"], 2), s["text"].strip()) for s in out["segments"])
        return Transcript(out["text"].strip(), out.get("language") or language or "", segs, duration)


def load_asr(cfg: ASRConfig, cache_dir: Path | None = None) -> ASR:
    if cfg.backend == "none":
        raise Unavailable("speech recognition is off", "set --asr-backend faster-whisper")
    if cfg.backend == "openai-whisper":
        return OpenAIWhisperASR(cfg.model)
    return FasterWhisperASR(cfg.model)


_SMALL = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]


def _normalise(text: str) -> list[str]:
    words = re.sub(r"[^\w\s']", " ", text.lower().replace("-", " ")).split()
    return [_SMALL[int(w)] if w.isdigit() and int(w) < 20 else w.strip("'") for w in words]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference length (case and punctuation ignored)."""
    ref, hyp = _normalise(reference), _normalise(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
