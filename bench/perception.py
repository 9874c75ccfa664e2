#!/usr/bin/env python3
"""Perception on the cpu profile, on media made here (nothing downloaded).

 - OCR: 12 text lines drawn over photo-like backgrounds (gradients, noise,
   shapes); a line counts when read exactly (case and spacing aside);
 - image: the whole image adapter (OCR, faces, colours, overlay) per 1280x960
   image, warm;
 - video: a 60 s 640x360 clip with 6 scenes and a spoken track: seconds of
   processing per minute of video, ours (sampled frames + scene cuts) side by
   side with the plain way (decode every frame and compare each), and with the
   sound track (events + Whisper);
 - audio events: milliseconds per 0.48 s window of the YAMNet classifier;
 - peak RSS.
Prints one JSON object as its last line and writes bench/results/perception.json.

    python bench/perception.py
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINES = ["OPEN 9 TO 5", "FRESH BREAD DAILY", "PLATFORM 4", "NO PARKING", "EXIT", "SALE 50% OFF",
         "MAIN STREET", "COFFEE 2.50", "WELCOME HOME", "GATE B12", "PUSH", "LIBRARY"]


def photo_like(rng, w=1280, h=960) -> np.ndarray:
    import cv2

    img = np.zeros((h, w, 3), np.float32)
    a, b = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    img[:] = np.linspace(a, b, h)[:, None, :]
    for _ in range(6):
        c = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.circle(img, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.uniform(40, 200)), c, -1)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def sign(img: np.ndarray, text: str, rng) -> np.ndarray:
    """A sign: a light panel with dark text (as on a real sign), somewhere on the picture."""
    import cv2

    h, w = img.shape[:2]
    scale = rng.uniform(1.6, 2.6)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 4)
    x, y = int(rng.uniform(20, max(21, w - tw - 40))), int(rng.uniform(th + 40, h - 40))
    cv2.rectangle(img, (x - 20, y - th - 20), (x + tw + 20, y + 20), (235, 235, 225), -1)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 30), 4, cv2.LINE_AA)
    return img


def norm(s: str) -> str:
    return " ".join(s.upper().split()).replace(" ", "")


def bench_images(tmp: Path) -> dict:
    from PIL import Image

    from engine.perception.image_tools import ImagePerception

    rng = np.random.default_rng(7)
    adapter = ImagePerception()
    warm = tmp / "warm.png"
    Image.fromarray(sign(photo_like(rng), "WARM UP", rng)).save(warm)
    adapter.perceive(warm, tmp)  # models load once
    hits, times = 0, []
    for i, line in enumerate(LINES):
        path = tmp / f"sign{i}.png"
        Image.fromarray(sign(photo_like(rng), line, rng)).save(path)
        start = time.perf_counter()
        p = adapter.perceive(path, tmp)
        times.append((time.perf_counter() - start) * 1000)
        hits += any(norm(o["text"]) == norm(line) for o in p.data["ocr"])
    return {"ocr_lines": len(LINES), "ocr_line_accuracy": round(hits / len(LINES), 3),
            "image_ms": round(float(np.median(times)), 1)}


def make_video(tmp: Path, tts) -> Path:
    import cv2

    from engine.speech.audio import write_wav
    from generators.ffmpeg import ffmpeg_exe

    silent = tmp / "scenes.avi"
    fps, w, h = 25, 640, 360
    out = cv2.VideoWriter(str(silent), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    rng = np.random.default_rng(3)
    for scene in range(6):
        base = photo_like(rng, w, h)
        for f in range(10 * fps):  # a moving ball in each 10 s scene
            frame = base.copy()
            cv2.circle(frame, (int(40 + f * 2) % w, h // 2), 30, (255, 255, 255), -1)
            out.write(frame)
    out.release()
    speech = np.concatenate([np.concatenate(list(tts.synthesize(t))) for t in (
        "Welcome to the harbour tour.", "Here you can see the old lighthouse.", "The boats leave every hour.")])
    wav = write_wav(tmp / "speech.wav", speech, tts.sample_rate)
    video = tmp / "clip.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(silent), "-i", str(wav), "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-af", "apad", "-t", "60", str(video)], check=True)
    return video


def plain_scenes(path: Path, image, out: Path) -> tuple[int, float]:
    """The plain way: decode every frame, compare each with the one before, and look at
    the first frame of each scene with the same image adapter."""
    import cv2

    start, cap, prev, keyframes = time.perf_counter(), cv2.VideoCapture(str(path)), None, []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        hist = cv2.calcHist([cv2.cvtColor(frame, cv2.COLOR_BGR2HSV)], [0, 1], None, [32, 32], [0, 180, 0, 256])
        cv2.normalize(hist, hist)
        if prev is None or cv2.compareHist(prev, hist, cv2.HISTCMP_BHATTACHARYYA) > 0.2:
            keyframes.append(frame)
        prev = hist
    cap.release()
    for i, frame in enumerate(keyframes):
        cv2.imwrite(str(out / f"plain{i}.png"), frame)
        image.perceive(out / f"plain{i}.png", out)
    return len(keyframes), time.perf_counter() - start


def bench_video(tmp: Path, asr, tts) -> dict:
    from engine.perception.audio_tools import AudioPerception
    from engine.perception.image_tools import ImagePerception
    from engine.perception.video_tools import VideoPerception

    video = make_video(tmp, tts)
    image, audio = ImagePerception(), AudioPerception(asr=asr)
    frames_only = VideoPerception(image=image, audio=None)
    full = VideoPerception(image=image, audio=audio)
    out = tmp / "seen"
    out.mkdir()
    frames_only.perceive(video, out)  # warm
    start = time.perf_counter()
    p = frames_only.perceive(video, out)
    ours = time.perf_counter() - start
    scenes_plain, plain = plain_scenes(video, image, out)
    start = time.perf_counter()
    q = full.perceive(video, out)
    with_audio = time.perf_counter() - start
    words = " ".join(s.get("text", "") for s in (q.data.get("audio") or {}).get("segments", [])).lower()
    return {"video_scenes_found": len(p.data["scenes"]), "video_scenes_made": 6, "video_scenes_plain": scenes_plain,
            "video_s_per_minute": round(with_audio, 2), "video_frames_s_per_minute": round(ours, 2),
            "video_plain_every_frame_s_per_minute": round(plain, 2),
            "video_frames_speedup_vs_plain": round(plain / ours, 2),
            "video_transcript_has_lighthouse": "lighthouse" in words}


def bench_audio_events(tmp: Path) -> dict:
    import soundfile as sf

    from engine.perception.audio_tools import AudioPerception

    rng = np.random.default_rng(1)
    sr = 16000
    t = np.arange(60 * sr) / sr
    audio = 0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2
    audio[20 * sr:40 * sr] = rng.normal(0, 0.1, 20 * sr)
    path = tmp / "events.wav"
    sf.write(str(path), audio.astype(np.float32), sr)
    adapter = AudioPerception(asr=None)
    adapter.perceive(path, tmp)  # warm
    start = time.perf_counter()
    p = adapter.perceive(path, tmp)
    total = (time.perf_counter() - start) * 1000
    windows = p.data.get("windows") or max(1, int(60 / 0.48))
    return {"audio_event_ms": round(total / windows, 2), "audio_events_model": p.data.get("event_model", ""),
            "audio_60s_ms": round(total, 1)}


def main() -> None:
    from engine.speech.asr import load_asr
    from engine.speech.tts import load_tts
    from engine.config import load_config

    cfg = load_config("cpu", env={})
    tmp = Path(tempfile.mkdtemp(prefix="omni-perception-"))
    asr = load_asr(cfg.asr)
    tts = load_tts(cfg.tts)
    result = {**bench_images(tmp), **bench_audio_events(tmp), **bench_video(tmp, asr, tts),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    out = ROOT / "bench" / "results" / "perception.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
