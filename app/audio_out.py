"""Speech audio encoded as it is made, for the OpenAI audio endpoints.

`Encoder(fmt, rate)` takes mono float32 blocks at `rate` and returns the bytes
ready to send after each block, so a client hears the first sentence while
the rest is still being synthesized. wav and pcm are written by hand (the WAV
header says "length unknown", as OpenAI's streamed WAV does); mp3, opus (in
Ogg), aac (ADTS) and flac go through PyAV (FFmpeg) into a non-seekable sink,
so no muxer seeks back to patch a header that was already sent.
"""
from __future__ import annotations

import struct

import numpy as np

PCM_RATE = 24_000  # OpenAI's raw pcm and pcm16 are 24 kHz mono s16le
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "aac": "audio/aac", "flac": "audio/flac"}
FORMATS = tuple(MEDIA_TYPES)
_AV = {"mp3": ("mp3", "libmp3lame", None), "opus": ("ogg", "libopus", 48_000), "aac": ("adts", "aac", None),
       "flac": ("flac", "flac", None)}  # format -> (container, codec, rate it needs or None: any)


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    """The format name, lower-case; ValueError listing the formats served otherwise."""
    name = str(fmt or "").lower()
    if name not in allowed:
        raise ValueError(f"response_format {str(fmt)[:20]!r} is not served; choose one of {', '.join(allowed)}")
    if name in _AV:
        import av

        if _AV[name][1] not in av.codecs_available:
            usable = [f for f in allowed if f not in _AV or _AV[f][1] in av.codecs_available]
            raise ValueError(f"this machine's FFmpeg has no {_AV[name][1]} encoder; choose one of {', '.join(usable)}")
    return name


def wav_header(rate: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 16-bit mono WAV header; the default length means "until the stream ends"."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def int16(x: np.ndarray) -> bytes:
    return (np.clip(np.asarray(x, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class _Sink:
    """A write-only, non-seekable file for PyAV: what the muxer wrote since the last take()."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class Encoder:
    """Mono float32 at `rate` in, encoded bytes out, block by block."""

    def __init__(self, fmt: str, rate: int) -> None:
        from engine.speech.audio import StreamResampler

        self.fmt, self.rate = check_format(fmt), rate
        self.media_type = MEDIA_TYPES[self.fmt]
        out_rate = PCM_RATE if self.fmt == "pcm" else (_AV.get(self.fmt, (0, 0, None))[2] or rate)
        self._resample = StreamResampler(rate, out_rate)
        self.out_rate = out_rate
        self._started = False
        self._container = self._stream = None
        if self.fmt in _AV:
            import av

            container, codec, _ = _AV[self.fmt]
            self._sink = _Sink()
            options = {"page_duration": "100000"} if container == "ogg" else {}  # an Ogg page per 0.1 s
            self._container = av.open(self._sink, "w", format=container, options=options)
            self._stream = self._container.add_stream(codec, rate=out_rate)
            self._stream.layout = "mono"

    def feed(self, audio: np.ndarray) -> bytes:
        return self._encode(self._resample(np.asarray(audio, np.float32)))

    def close(self) -> bytes:
        tail = self._encode(self._resample(np.zeros(0, np.float32), last=True))
        if self._container is None:
            return tail
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return tail + self._sink.take()

    def _encode(self, x: np.ndarray) -> bytes:
        head = b""
        if not self._started:
            self._started = True
            head = wav_header(self.out_rate) if self.fmt == "wav" else b""
        if self._container is None:
            return head + int16(x)
        if len(x):
            import av

            frame = av.AudioFrame.from_ndarray(np.frombuffer(int16(x), "<i2")[None, :], format="s16", layout="mono")
            frame.sample_rate = self.out_rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()


def encode_all(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    """A whole clip in one format (a WAV gets its real length in the header)."""
    if str(fmt).lower() == "wav":
        pcm = int16(audio)
        return wav_header(rate, len(pcm)) + pcm
    enc = Encoder(fmt, rate)
    return enc.feed(audio) + enc.close()
