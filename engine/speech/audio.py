"""Audio in every shape the world sends it, made into what the models want.

Browsers send 48 kHz int16 (often stereo), Whisper and Silero want 16 kHz
mono float32, Piper speaks at 22.05 kHz. Everything goes through
`to_mono_float32` and `resample`, which handle int/float, mono/stereo,
empty and silent input, and clip what lies outside [-1, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WHISPER_RATE = 16_000


def to_mono_float32(pcm: np.ndarray | bytes, channels: int = 1) -> np.ndarray:
    """Any PCM -> mono float32 in [-1, 1].

    bytes are read as int16 interleaved over `channels`. Arrays may be
    (samples,), (samples, channels) or (channels, samples) with <= 8 channels.
    """
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        pcm = np.frombuffer(pcm, dtype="<i2")
        if channels > 1:
            pcm = pcm[: len(pcm) // channels * channels].reshape(-1, channels)
    x = np.asarray(pcm)
    if x.size == 0:
        return np.zeros(0, np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D or 2-D, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):  # scale before mixing channels
        info = np.iinfo(x.dtype)
        if info.min == 0:  # unsigned (8-bit WAV): centre it
            x = (x.astype(np.float64) - (info.max + 1) / 2) / ((info.max + 1) / 2)
        else:
            x = x.astype(np.float64) / -info.min
    if x.ndim == 2:
        if x.shape[0] <= 8 and x.shape[1] > x.shape[0]:
            x = x.T  # (channels, samples)
        x = x.astype(np.float64).mean(axis=1)
    x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(x, -1.0, 1.0)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """High-quality resampling (soxr) of mono float32."""
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    x = np.asarray(x, np.float32)
    if rate_in == rate_out or x.size == 0:
        return x
    import soxr

    return soxr.resample(x, rate_in, rate_out).astype(np.float32)


def prepare(pcm, rate_in: int, rate_out: int = WHISPER_RATE, channels: int = 1) -> np.ndarray:
    """Any PCM at `rate_in` -> mono float32 at `rate_out`."""
    return resample(to_mono_float32(pcm, channels), rate_in, rate_out)


class StreamResampler:
    """Chunk-by-chunk resampling for live audio (same result as one shot, within soxr's delay)."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        import soxr

        self.rate_in, self.rate_out = rate_in, rate_out
        self._rs = soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32") if rate_in != rate_out else None

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return x if self._rs is None else self._rs.resample_chunk(x, last=last)


def to_int16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")


def write_wav(path: str | Path, x: np.ndarray, rate: int) -> Path:
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), to_int16(np.asarray(x, np.float32)), rate, subtype="PCM_16")
    return path


def rms_db(x: np.ndarray) -> float:
    """Loudness in dBFS (-inf for silence)."""
    if x.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return 20 * np.log10(rms) if rms > 0 else float("-inf")
