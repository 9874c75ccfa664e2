"""Whisper's log-mel features of long audio, computed a block of frames at a time.

faster-whisper's FeatureExtractor takes the STFT of the whole recording at once: for 20
minutes that is 120,000 frames of 400 samples windowed, their complex spectra and the
magnitudes, and transcribing 20 minutes of MP3 peaked 1.1 GB above the resting RSS (issue
25). Each STFT frame depends only on its own 400 samples, so computing BLOCK_FRAMES frames
at a time and joining the mel rows gives the same numbers; the one global step (the floor
at the loudest value minus 8) is applied once to the joined features, as the original
does. Memory: the features themselves (80 x 100 floats a second, 38 MB for 20 minutes)
plus one block.
"""
from __future__ import annotations

import numpy as np

BLOCK_FRAMES = 6000  # 60 s of 10 ms frames per block


def block_features(extractor_cls):
    """A subclass of faster-whisper's FeatureExtractor (passed in: it is imported lazily)
    whose call works in blocks; short audio goes through the original unchanged."""

    class BlockFeatureExtractor(extractor_cls):
        def __call__(self, waveform: np.ndarray, padding=160, chunk_length=None):
            n_fft, hop = self.n_fft, self.hop_length
            if len(waveform) + padding <= BLOCK_FRAMES * hop + n_fft:
                return super().__call__(waveform, padding=padding, chunk_length=chunk_length)
            if chunk_length is not None:
                self.n_samples = chunk_length * self.sampling_rate
                self.nb_max_frames = self.n_samples // hop
            x = np.pad(np.asarray(waveform, np.float32), (0, padding)) if padding else np.asarray(waveform, np.float32)
            x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")  # what stft(center=True) does
            n_frames = 1 + (len(x) - n_fft) // hop - 1  # the original drops the last frame
            window = np.hanning(n_fft + 1)[:-1].astype("float32")
            out = np.empty((self.mel_filters.shape[0], n_frames), np.float32)
            for a in range(0, n_frames, BLOCK_FRAMES):
                b = min(n_frames, a + BLOCK_FRAMES)
                piece = x[a * hop:(b - 1) * hop + n_fft]
                stft = self.stft(piece, n_fft, hop, window=window, center=False, return_complex=True)
                out[:, a:b] = self.mel_filters @ (np.abs(stft.astype("complex64")) ** 2)
            np.log10(np.clip(out, 1e-10, None, out=out), out=out)
            np.maximum(out, out.max() - 8.0, out=out)
            out += 4.0
            out /= 4.0
            return out

    return BlockFeatureExtractor


def install(model) -> None:
    """Give a faster_whisper.WhisperModel the block-wise feature extractor (same settings)."""
    from faster_whisper.feature_extractor import FeatureExtractor

    model.feature_extractor = block_features(FeatureExtractor)(**model.feat_kwargs)
