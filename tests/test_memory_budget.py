"""Issue 25, item 2: a memory budget per request (engine/memory_budget.py).

The three requests that each added 1.2-1.4 GB (a 7999x7999 RGBA PNG, long MP3 noise, an
8000x8000 video), made here in code and small on disk, go through ingest and the engine's
perception in this process, measured as tests/memprobe.py does (peak RSS above the start,
sampled every 5 ms): each stays within the default budget. With a smaller budget, files
whose decode cannot fit are refused with an error naming the file and the limit, before
they are decoded. The reduced picture still reads right (OCR of big text, its colours).
"""
from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

import hostile
import memprobe
from engine import memory_budget
from engine.errors import InputError
from engine.media import ingest

BUDGET = memory_budget.DEFAULT_MB * 1e6


def png_rows(path: Path, w: int, h: int, row) -> Path:
    """An RGBA PNG written a row at a time (`row(y)` -> (w, 4) uint8): never whole in memory."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)))
        idat = b""
        for y in range(h):
            idat += comp.compress(b"\0" + row(y).tobytes())
            if len(idat) > 1 << 20:
                f.write(chunk(b"IDAT", idat))
                idat = b""
        f.write(chunk(b"IDAT", idat + comp.flush()) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import cv2
    import soundfile as sf

    d = tmp_path_factory.mktemp("budget")
    # 7999x7999 RGBA: big black words on white in the top half, red below, a transparent strip (on white)
    side, k = 7999, 8
    words = np.full((side // 2 // k, -(-side // k)), 255, np.uint8)
    cv2.putText(words, "BUDGET", (60, 330), cv2.FONT_HERSHEY_SIMPLEX, 8, 0, 30)
    red, clear = np.tile([[200, 20, 20, 255]], (side, 1)).astype(np.uint8), np.zeros((side, 4), np.uint8)
    rows = {}

    def row(y: int) -> np.ndarray:
        if y >= len(words) * k:
            return red
        if y // k not in rows:
            grey = np.repeat(words[y // k], k)[:side]
            rows.clear()
            rows[y // k] = np.stack([grey, grey, grey, np.full(side, 255, np.uint8)], 1)
            rows[y // k][: side // 20] = clear[: side // 20]
        return rows[y // k]

    png = png_rows(d / "huge.png", side, side, row)
    rng = np.random.default_rng(0)  # 2 minutes of noise as MP3 (each block of it decoded, analysed, dropped)
    with sf.SoundFile(str(d / "noise.mp3"), "w", 8000, 1, format="MP3") as f:
        for _ in range(12):
            f.write((rng.standard_normal(80_000) * 0.3).astype(np.float32))
    avi = d / "big.avi"
    avi.write_bytes(hostile.avi_mjpeg([hostile.jpeg_flat(8000, 8000)] * 3, 8000, 8000))
    assert max(p.stat().st_size for p in (png, avi)) < 2_000_000
    return {"png": png, "mp3": d / "noise.mp3", "avi": avi}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.config import load_config
    from engine.engine import Engine

    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path_factory.mktemp("data"))}, env={}))
    warm = tmp_path_factory.mktemp("warm")
    for name, data in (("w.png", hostile.png(64, 48)), ("w.avi", hostile.originals()[".avi"]),
                       ("w.wav", hostile.sound("WAV", 2.0))):
        (warm / name).write_bytes(data)  # the models load before anything is measured
        eng.perceiver.perceive(ingest(warm / name, eng.media_dir, 10**8))
    yield eng
    memory_budget.configure(memory_budget.DEFAULT_MB)
    eng.close()


def look(engine, path: Path) -> tuple[dict, float]:
    """Ingest + perceive `path` in a fresh thread (as the server's workers do): (result, peak MB above the start)."""
    peak, out = memprobe.Peak(), {}

    def work() -> None:
        try:
            rec = ingest(path, engine.media_dir, 10**9)
            out["perception"] = engine.perceiver.perceive(rec)
        except InputError as exc:
            out["error"] = str(exc)

    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        return out, peak.peak_mb
    finally:
        peak.stop()


def test_each_big_request_stays_within_the_budget(engine, files):
    assert memory_budget.limit() == BUDGET
    got = {kind: look(engine, path) for kind, path in files.items()}
    figures = {kind: round(mb) for kind, (_, mb) in got.items()}
    print(figures)  # the figures the issue quotes, per kind (bench/reliability.py asks for them in a file)
    if os.environ.get("OMNI_MEMORY_REPORT"):
        Path(os.environ["OMNI_MEMORY_REPORT"]).write_text(json.dumps({
            "budget_mb": memory_budget.DEFAULT_MB, "peak_growth_mb": figures,
            "files": {kind: f"{path.name}, {path.stat().st_size / 1e6:.1f} MB on disk" for kind, path in files.items()}}))
    for kind, (out, mb) in got.items():
        assert "perception" in out, (kind, out)
        assert mb * 1e6 < BUDGET, (kind, mb)
    image = got["png"][0]["perception"]
    assert image.data["size"] == [7999, 7999]
    assert "BUDGET" in " ".join(line["text"] for line in image.data["ocr"]).upper().replace(" ", ""), image.facts
    shares = {c["name"]: c["share"] for c in image.data["colors"]}
    assert shares.get("white", 0) > 30 and sum(v for n, v in shares.items() if "red" in n) > 30, shares
    assert got["mp3"][0]["perception"].data["duration_s"] == pytest.approx(120, abs=1)
    assert "8000x8000" in got["avi"][0]["perception"].facts


def test_a_decode_that_cannot_fit_is_refused_before_it_starts(engine, files):
    memory_budget.configure(128)
    try:
        for kind in ("png", "avi"):
            out, mb = look(engine, files[kind])
            assert "error" in out, (kind, out)
            assert files[kind].name in out["error"] and "the limit is 128 MB" in out["error"], out["error"]
            assert "--max-request-memory-mb" in out["error"]
            assert mb < 60, (kind, mb)  # refused from the header: nothing was decoded
    finally:
        memory_budget.configure(memory_budget.DEFAULT_MB)


def test_whisper_features_of_long_audio_are_made_in_blocks_and_equal():
    """20 minutes through faster-whisper's front end: 1.1 GB at once before, a block now."""
    from faster_whisper.feature_extractor import FeatureExtractor

    from engine.speech.features import BLOCK_FRAMES, block_features

    blocked = block_features(FeatureExtractor)()
    rng = np.random.default_rng(1)
    clip = (rng.standard_normal(BLOCK_FRAMES * 160 * 2 + 777) * 0.1).astype(np.float32)
    np.testing.assert_allclose(blocked(clip), FeatureExtractor()(clip), atol=1e-5)
    long = (rng.standard_normal(20 * 60 * 16_000) * 0.1).astype(np.float32)
    peak = memprobe.Peak()
    try:
        feats = blocked(long)
        assert feats.shape[0] == 80 and feats.shape[1] >= 20 * 60 * 100 and peak.peak_mb < 200, peak.peak_mb
    finally:
        peak.stop()


def test_the_budget_is_a_setting_with_a_floor():
    from engine.config import ConfigError, load_config

    assert load_config("tiny", env={}).max_request_memory_mb == memory_budget.DEFAULT_MB == 768
    assert load_config("tiny", overrides={"max_request_memory_mb": "2048"}, env={}).max_request_memory_mb == 2048
    assert load_config("tiny", env={"OMNI_MAX_REQUEST_MEMORY_MB": "300"}).max_request_memory_mb == 300
    with pytest.raises(ConfigError, match="max_request_memory_mb"):
        load_config("tiny", overrides={"max_request_memory_mb": "10"}, env={})
