"""Voice activity detection: Silero VAD (v5) run from the ONNX inside the
`silero-vad` wheel with onnxruntime directly (no torch, no hub), plus
offline segmentation of a recording into utterances with the same
hysteresis the live duplex path uses.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from engine.config import VADConfig
from engine.errors import Unavailable

FRAME = 512  # 32 ms at 16 kHz, the v5 model's frame
CONTEXT = 64  # samples of the previous frame the v5 model sees
RATE = 16_000


class SileroVAD:
    sample_rate = RATE
    frame_samples = FRAME
    name = "Silero VAD v5 (ONNX)"

    def __init__(self, model: str = "silero-v5") -> None:
        import onnxruntime as ort

        from engine.packaged import resolve_named

        path = resolve_named("vad", model) or model
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise Unavailable(f"cannot load the VAD model {model!r}: {exc}", "set --set vad.model=silero-v5") from None
        self._sr = np.array(RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        frame = np.asarray(frame, np.float32)
        if frame.shape != (FRAME,):
            raise ValueError(f"Silero VAD takes frames of {FRAME} samples at 16 kHz, got shape {frame.shape}")
        x = np.concatenate([self._context, frame])[None, :]
        prob, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = frame[-CONTEXT:]
        return float(prob[0, 0])


def load_vad(cfg: VADConfig) -> SileroVAD:
    if cfg.backend == "none":
        raise Unavailable("voice activity detection is off", "set --set vad.backend=silero")
    return SileroVAD(cfg.model)


def utterances(audio: np.ndarray, vad: Callable[[np.ndarray], float], cfg: VADConfig,
               pad_ms: int = 100) -> list[tuple[float, float, np.ndarray]]:
    """(start_s, end_s, audio) of each utterance in a 16 kHz recording."""
    audio = np.asarray(audio, np.float32)
    frame_ms = FRAME * 1000 / RATE
    speech_run = silence_run = 0.0
    start = None
    found: list[tuple[int, int]] = []
    for i in range(0, len(audio) - FRAME + 1, FRAME):
        speech = vad(audio[i:i + FRAME]) >= cfg.threshold
        if start is None:
            speech_run = speech_run + frame_ms if speech else 0.0
            if speech_run >= cfg.min_speech_ms:
                start, silence_run = i + FRAME - int(speech_run * RATE / 1000), 0.0
        else:
            silence_run = 0.0 if speech else silence_run + frame_ms
            if silence_run >= cfg.end_silence_ms:
                found.append((start, i + FRAME - int(silence_run * RATE / 1000)))
                start, speech_run = None, 0.0
    if start is not None:
        found.append((start, len(audio)))
    pad = int(pad_ms * RATE / 1000)
    out = []
    for a, b in found:
        a, b = max(0, a - pad), min(len(audio), b + pad)
        out.append((a / RATE, b / RATE, audio[a:b]))
    return out
