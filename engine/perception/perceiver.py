"""Seeing and hearing attached media: the engine's side of the modality adapters.

`Perceiver.perceive(record, cancel)` turns one stored file into grounded
facts (engine/perception/: OCR, faces, colours for images; speech, music and
noise segments with transcripts and audio-event labels for audio; scene
keyframes plus the sound track for video). Each file is looked at once: the
result is kept by content hash, and its facts are stored with the turn, so
later questions ("compare it with the first photo") still have them after a
restart. The adapters load their models on first use, one instance each.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from engine.perception.base import Perception, printable, public_message, release_memory
from engine.errors import InputError, Unavailable
from generators.base import Cancelled

CACHE = 64  # perceptions kept in memory
CACHE_BYTES = 16_000_000  # and their size (a long video's scenes and transcripts are large)
log = logging.getLogger(__name__)
BACKBONE = "backbone"  # perception.vl_model: no separate VLM, the omni LLM sees the media (engine/llm/omni.py)


class Perceiver:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.cfg = engine.config.perception
        self._lock = threading.RLock()  # (the video adapter is made from the image and audio ones)
        self._adapters: dict[str, object] = {}
        self._seen: OrderedDict[tuple[str, str], tuple[Perception, int]] = OrderedDict()  # -> (perception, its size)
        self._seen_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.backend != "none"

    def _adapter(self, kind: str):
        with self._lock:
            if kind not in self._adapters:
                self._adapters[kind] = self._make(kind)
            return self._adapters[kind]

    def _make(self, kind: str):
        cfg = self.cfg
        if kind == "image":
            from engine.perception.image_tools import ImagePerception

            return ImagePerception(ocr=cfg.ocr, faces=cfg.faces, labels=cfg.labels)
        if kind == "audio":
            from engine.perception.audio_tools import AudioPerception

            try:
                asr = self.engine.roles["asr"].get()
            except Unavailable:
                asr = None  # sounds are still labelled; speech is not transcribed (the facts say so)
            return AudioPerception(asr=asr, events=cfg.audio_events)
        if kind == "video":
            from engine.perception.video_tools import VideoPerception

            return VideoPerception(image=self._adapter("image"), audio=self._adapter("audio"),
                                   max_keyframes=cfg.max_keyframes)
        raise InputError(f"no adapter reads {kind} files")

    def perceive(self, record, cancel=None, question: str = "") -> Perception:
        """Facts about one MediaRecord. Raises InputError for unreadable media. The tools'
        facts are cached by content; on the neural path a vision-language model then looks at
        the image or video itself with the user's question (not cached: the question varies)."""
        p = self._tools(record, cancel)
        if self.cfg.backend != "neural" or record.kind not in ("image", "video"):
            return p
        if self.cfg.vl_model == BACKBONE:  # the omni LLM looks at the pixels itself when it answers
            return p
        p = Perception(p.kind, p.name, p.facts, dict(p.data), list(p.overlays), dict(p.timings_ms))
        try:
            v = self._vlm().perceive(Path(record.path), self._out(record), cancel, question=question)
        except (Unavailable, InputError) as exc:
            p.facts += f" (No model description: {public_message(str(exc), record.path, record.name)}.)"
            return p
        except Cancelled:
            raise
        except Exception as exc:  # the model failed on this file: the tools' facts still stand
            log.exception("the vision-language model failed on %s (%s)", record.name, record.sha256)
            p.facts += f" (No model description: the model failed ({type(exc).__name__}).)"
            return p
        p.facts += f" Model description ({v.data.get('model', 'VLM')}): {v.data.get('description', v.facts)}"
        p.data["vlm"] = v.data
        p.timings_ms.update({f"vlm_{k}": ms for k, ms in v.timings_ms.items()})
        return p

    def _out(self, record) -> Path:
        out = self.engine.media_dir / "seen" / record.sha256[:2] / record.sha256
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _tools(self, record, cancel=None) -> Perception:
        """The perception tools' facts about one file, cached by content (bounded in entries and
        bytes). Errors come out as InputError in the user's words: the adapters see the stored
        copy (<sha256>.png in the data dir), the user knows their own file name."""
        key = (record.sha256, record.kind)
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                hit = self._seen[key][0]
                return Perception(hit.kind, record.name, hit.facts.replace(hit.name, record.name, 1),
                                  hit.data, hit.overlays, {"cached": 0.0})
        started = time.perf_counter()
        try:
            p = self._adapter(record.kind).perceive(Path(record.path), self._out(record), cancel)
        except InputError as exc:
            error = InputError(public_message(str(exc), record.path, record.name))
        except (Cancelled, Unavailable):
            raise
        except Exception as exc:  # a decoder's bug on hostile bytes: the user's turn goes on without it
            log.exception("perceiving %s (%s) failed", record.name, record.sha256)
            error = InputError(f"{printable(record.name)}: the {record.kind} could not be read ({type(exc).__name__})")
        else:
            error = None
        release_memory()  # after the except clauses: a failure's frames (decoded pixels) are freed by then
        if error is not None:
            raise error
        p.facts = p.facts.replace(Path(record.path).name, record.name)  # the user's name, not the stored one
        p.name = record.name
        p.timings_ms.setdefault("total", round((time.perf_counter() - started) * 1000, 1))
        self._remember(key, p)
        return p

    def _remember(self, key, p: Perception) -> None:
        size = len(p.facts) + len(json.dumps(p.data, default=str)) + sum(map(len, p.overlays))
        if size > CACHE_BYTES // 4:
            return  # one huge result would push out everything else
        with self._lock:
            if key in self._seen:
                self._seen_bytes -= self._seen.pop(key)[1]
            self._seen[key] = (p, size)
            self._seen_bytes += size
            while len(self._seen) > CACHE or self._seen_bytes > CACHE_BYTES:
                self._seen_bytes -= self._seen.popitem(last=False)[1][1]

    def _vlm(self):
        with self._lock:
            if "vlm" not in self._adapters:
                from engine.perception.neural import VisionLanguageAdapter

                self._adapters["vlm"] = VisionLanguageAdapter(self.cfg.vl_model, quantization=self.cfg.vl_quantization)
            return self._adapters["vlm"]

    def status(self) -> tuple[str, str]:
        if not self.enabled:
            return "unavailable", "perception.backend is none: set --set perception.backend=tools"
        tools = "tools: OCR (rapidocr), faces (nudenet), colours, audio events (YAMNet), scene keyframes"
        if self.cfg.backend == "neural" and self.cfg.vl_model == BACKBONE:
            return "ready", f"{tools}; images and video also seen by the LLM itself when it is an omni model"
        if self.cfg.backend == "neural":
            return "ready", f"{tools}; images and video also described by {self.cfg.vl_model}"
        return "ready", tools
