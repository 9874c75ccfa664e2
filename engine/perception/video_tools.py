"""Video perception: scenes, a keyframe per scene seen by the image adapter, and the sound track.

Frames are decoded sequentially, one at a time (engine/perception/video_frames.py: PyAV,
within the request's memory budget), sampling ~4 fps (fewer for long videos), and
each sample is converted straight to a small picture, so memory stays flat. A scene
starts where the HSV histogram of a sample differs from the previous sample's
by more than CUT (Bhattacharyya distance) and three times the recent mean
distance (camera motion raises it), plus one at 0:00. When there are
more scenes than `max_keyframes` (the token budget), the strongest cuts are
kept spread over the length: the video is split into equal bins, the best cut
of each bin goes first, then the strongest of the rest. Only a few candidate
frames per bin are held (downscaled), never the whole video. Each keyframe is
written as a PNG and given to `image.perceive` (any object with that method;
without one a tiny colour/size description is used); the sound track goes to
`audio.perceive` when the file has one.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import cv2
import numpy as np

from engine.perception.base import Perception, check, mmss, public_message
from engine.errors import InputError

CUT = 0.2  # Bhattacharyya distance between consecutive samples that starts a scene, and 3x the recent mean
SAMPLE_FPS = 4.0
MAX_SAMPLES = 7200  # fewer samples a second for long videos
KEEP_PER_BIN = 3
THUMB = 640  # stored candidate keyframes are at most this on their longest side
FACTS_LIMIT = 2500

_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_HUE_EDGES = (8, 20, 33, 80, 98, 130, 150, 170)  # OpenCV hue (0-180) upper edges of _COLOURS; red again after


def fit(frame: np.ndarray, side: int, interpolation=cv2.INTER_AREA) -> np.ndarray:
    """`frame` scaled so that its longest side is at most `side` (never up, never to 0 px). Sizes
    follow the longest side, not the width: a 1x60000 frame made 160 px wide was 4.6 GB."""
    h, w = frame.shape[:2]
    if max(h, w) <= side:
        return frame
    f = side / max(h, w)
    return cv2.resize(frame, (max(1, round(w * f)), max(1, round(h * f))), interpolation=interpolation)


def _hist(frame: np.ndarray) -> np.ndarray:
    small = fit(frame, 160)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    h = cv2.calcHist([hsv], [0, 1, 2], None, [16, 8, 8], [0, 180, 0, 256, 0, 256])
    return cv2.normalize(h, h, 1.0, 0.0, cv2.NORM_L1).flatten()


def colour_summary(frame: np.ndarray) -> tuple[str, dict]:
    """The fallback 'image adapter': size and dominant named colours of a BGR frame."""
    h, w = frame.shape[:2]
    hsv = cv2.cvtColor(cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2HSV).reshape(-1, 3)
    hue, sat, val = (hsv[:, i].astype(int) for i in range(3))
    names = np.where(val < 50, "black", np.where(sat < 40, np.where(val > 200, "white", "gray"),
                     np.array(_COLOURS + ("red",))[np.searchsorted(_HUE_EDGES, hue, side="right")]))
    found, counts = np.unique(names, return_counts=True)
    order = np.argsort(-counts)
    colours = [[str(found[i]), round(float(counts[i]) / len(names), 2)] for i in order if counts[i] / len(names) >= 0.1]
    text = f"{w}x{h}, colours: " + ", ".join(f"{n} {s:.0%}" for n, s in colours)
    return text, {"size": [w, h], "colours": colours, "brightness": round(float(val.mean()) / 255, 2)}


class VideoPerception:
    def __init__(self, image=None, audio=None, max_keyframes: int = 12, max_seconds: float = 4 * 3600) -> None:
        self.image, self.audio = image, audio
        self.max_keyframes, self.max_seconds = max(1, max_keyframes), max_seconds

    def perceive(self, path, out_dir, cancel=None) -> Perception:
        from generators.base import RequestError
        from generators.ffmpeg import probe

        path, out_dir = Path(path), Path(out_dir)
        t0 = time.perf_counter()
        check(cancel)
        if path.is_file() and path.stat().st_size == 0:
            raise InputError(f"could not read the video {path.name}: the file is empty (0 bytes)")
        try:
            info = probe(path)
        except RequestError as exc:
            raise InputError(str(exc)) from None
        if info["duration_s"] > self.max_seconds:
            raise InputError(f"{path.name} is {mmss(info['duration_s'])} long; the limit is {mmss(self.max_seconds)}")
        t1 = time.perf_counter()
        fps, size, n_scenes, picked, last_t = self._scan(path, info, cancel)
        duration = max(info["duration_s"], last_t)
        t2 = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        scenes, texts = [], []
        for i, (t, _, frame) in enumerate(picked):
            check(cancel)
            key = out_dir / f"keyframe_{i + 1:02d}_{int(t // 60)}m{t % 60:04.1f}s.png"
            cv2.imwrite(str(key), frame)
            if self.image is not None:
                p = self.image.perceive(key, out_dir, cancel)
                text, data = p.facts, p.data
            else:
                text, data = colour_summary(frame)
            scenes.append({"t": round(t, 2), "keyframe": str(key), "image": data})
            texts.append(re.sub(r"^Image \S+, ", "", " ".join(text.split())))  # the keyframe's name says nothing
        t3 = time.perf_counter()
        audio_data, audio_text = None, "no audio track"
        if info["has_audio"] and self.audio is None:
            audio_text = "not analysed (no audio adapter)"
        elif info["has_audio"]:
            try:
                ap = self.audio.perceive(path, out_dir, cancel)
                audio_data = ap.data
                audio_text = self._audio_text(ap)
            except InputError as exc:  # ffmpeg's reason quotes the file's path: the facts must not
                audio_text = f"could not be analysed: {public_message(str(exc), path, path.name)}"
        t4 = time.perf_counter()
        shown = f"{n_scenes} scene{'s' * (n_scenes != 1)}"
        shown += f" (the {len(picked)} strongest shown)" if n_scenes > len(picked) else ""
        head = f"Video {path.name}, {mmss(duration)}, {size[0]}x{size[1]}, {fps:.3g} fps, {shown}. "
        tail = f" Audio: {audio_text}"
        budget = max(60, (FACTS_LIMIT - len(head) - min(len(tail), 1000)) // max(1, len(texts)) - 20)
        parts = [f"{mmss(s['t'])} scene {i + 1}: " + (tx if len(tx) <= budget else tx[:budget - 3] + "...")
                 for i, (s, tx) in enumerate(zip(scenes, texts))]
        facts = head + " | ".join(parts) + (tail if len(tail) <= 1000 else tail[:997] + "...")
        sheet = self._contact_sheet([(t, f) for t, _, f in picked], out_dir / "contact_sheet.png")
        data = {"duration_s": round(duration, 2), "fps": round(fps, 3), "size": list(size), "scene_count": n_scenes,
                "scenes": scenes, "audio": audio_data}
        timings = {"probe": round((t1 - t0) * 1000, 1), "scenes": round((t2 - t1) * 1000, 1),
                   "keyframes": round((t3 - t2) * 1000, 1), "audio": round((t4 - t3) * 1000, 1),
                   "total": round((time.perf_counter() - t0) * 1000, 1)}
        return Perception("video", path.name, facts, data, [str(sheet)], timings)

    @staticmethod
    def _audio_text(ap: Perception) -> str:
        if "segments" in ap.data and "shares" in ap.data:
            from engine.perception.audio_tools import summarize

            return summarize(ap.data, 1000)
        return ap.facts

    def _scan(self, path: Path, info: dict, cancel):
        """One sequential pass: (fps, (w, h), scene count, [(t, strength, frame)] picked, last sample time).
        Frames come decoded one at a time and already scaled to THUMB (engine/perception/video_frames.py)."""
        from engine.perception.video_frames import VideoFrames

        with VideoFrames(path) as video:
            fps = video.fps or info["fps"] or 25.0
            duration = max(info["duration_s"], 1e-3)
            rate = min(SAMPLE_FPS, max(0.05, MAX_SAMPLES / duration))
            step = max(1, int(round(fps / rate)))
            n_bins = max(1, self.max_keyframes - 1)
            bins: list[list] = [[] for _ in range(n_bins)]  # strongest candidate cuts per time bin
            first, prev, n_scenes, size, t, recent = None, None, 0, (0, 0), 0.0, 0.03
            for t, frame in video.frames(every=step, side=THUMB, cancel=cancel):
                size = video.size
                hist = _hist(frame)
                if first is None:
                    first, n_scenes = (0.0, 1.0, frame), 1
                else:
                    d = float(cv2.compareHist(prev, hist, cv2.HISTCMP_BHATTACHARYYA))
                    if d <= max(CUT, 3 * recent):
                        recent = 0.9 * recent + 0.1 * d
                    else:
                        n_scenes += 1
                        b = bins[min(n_bins - 1, int(t / duration * n_bins))]
                        if len(b) < KEEP_PER_BIN or d > b[-1][1]:
                            b.append((t, d, frame))
                            b.sort(key=lambda c: -c[1])
                            del b[KEEP_PER_BIN:]
                prev = hist
        if first is None:
            raise InputError(f"could not read the video {path.name}: no frame could be decoded")
        if self.max_keyframes == 1:
            return fps, size, n_scenes, [first], t
        best = [b[0] for b in bins if b]
        rest = sorted((c for b in bins for c in b[1:]), key=lambda c: -c[1])
        chosen = (best + rest)[: self.max_keyframes - 1]
        return fps, size, n_scenes, [first] + sorted(chosen, key=lambda c: c[0]), t

    @staticmethod
    def _thumb(frame: np.ndarray) -> np.ndarray:
        small = fit(frame, THUMB)
        return small.copy() if small is frame else small

    @staticmethod
    def _contact_sheet(frames: list, dest: Path, width: int = 240, cols: int = 4) -> Path:
        thumbs = []
        for t, f in frames:  # each fits a width x 1.5 width cell, whatever the frame's shape
            h, w = f.shape[:2]
            s = min(width / w, 1.5 * width / h)
            small = cv2.resize(f, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            th = cv2.copyMakeBorder(small, 0, 24, 0, width - small.shape[1], cv2.BORDER_CONSTANT, value=(32, 32, 32))
            cv2.putText(th, mmss(t), (6, small.shape[0] + 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1,
                        cv2.LINE_AA)
            thumbs.append(th)
        cell_h = max(t.shape[0] for t in thumbs)
        rows = [thumbs[i:i + cols] for i in range(0, len(thumbs), cols)]
        sheet = np.full((len(rows) * (cell_h + 4) + 4, min(cols, len(thumbs)) * (width + 4) + 4, 3), 16, np.uint8)
        for r, row in enumerate(rows):
            for c, th in enumerate(row):
                y, x = 4 + r * (cell_h + 4), 4 + c * (width + 4)
                sheet[y:y + th.shape[0], x:x + width] = th
        cv2.imwrite(str(dest), sheet)
        return dest
