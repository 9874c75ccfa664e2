"""Audio files as people send them -> mono float32 at the rate a caller asks, within bounds.

The one place a file of sound is decoded: the API's uploads (app/speech_roles.decode_16k), the
attachment check (engine/media.py), the audio perception adapter and the fast transcription
path (engine/perception/). Containers: WAV, FLAC, OGG (Vorbis, Opus), MP3 through soundfile
(libsndfile) where it opens the file; everything else, and what libsndfile cannot open, through
PyAV (FFmpeg's libraries, in process): WebM/Opus from a browser's MediaRecorder, M4A/MP4 (AAC)
from phones, raw AAC, MKA, and the sound track of a video.

Bounded: a duration the container declares is held to the caller's limit before a sample is
decoded, and the decoded samples are counted while they come (a header may lie, and a live
recording declares none), so decoding stops as soon as the limit is passed. Audio comes out in
blocks of `block_s` seconds at the asked rate, so memory is the caller's limit at most
(`decode`) or one block (`blocks`). Every decoder failure (libsndfile losing sync mid-file,
FFmpeg's errors, a truncated file, no audio stream) is an InputError naming the file by the
name it is given, never by the path it lies at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import InputError, without_paths

ACCEPTED = "WAV, FLAC, OGG (Vorbis, Opus), MP3, M4A/AAC or WebM/Opus"  # what people are told to send
BLOCK_S = 10.0  # seconds of audio decoded and handed on at a time
SAMPLE_RATES = (1_000, 768_000)  # 1 Hz audio of 3 kB would be 26 minutes at 16 kHz to analyse
MAX_CHANNELS = 64
SLACK_S = 0.25  # a decoder may give this much more than a container declares (codec padding)
# FFmpeg's demuxers that may read an upload (its probing picks among them by content): media
# formats only, no playlists or concat lists that would open other files or URLs
DEMUXERS = ("wav,w64,flac,ogg,mp3,aac,mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,aiff,caf,au,amr,"
            "mpegts,mpeg,asf,wv,ape,tta")
_EXACT = {"WAV", "WAVEX", "W64", "RF64", "FLAC", "AIFF", "CAF", "AU"}  # libsndfile formats that count samples
_EXACT_AV = ("mov", "matroska", "webm", "wav", "flac")  # FFmpeg demuxers whose duration is declared, not guessed


class Undecodable(InputError):
    """The file is damaged, truncated or not audio. `detail` is the decoder's reason (no paths)."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name, self.detail = name, detail
        super().__init__(f"{name}: the audio is damaged or truncated and cannot be read"
                         + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float | None  # what the container declares; None when it does not say (a live recording)
    sample_rate: int
    channels: int
    codec: str  # "FLAC", "VORBIS", "opus", "aac", ...
    container: str  # "WAV", "OGG", "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2", ...
    reader: str  # "soundfile" | "pyav"
    has_video: bool = False  # a picture track besides the sound (cover art does not count)
    exact: bool = False  # the duration counts samples: a stream that ends well short of it is truncated


def span(seconds: float) -> str:
    """1:05:00, 4:07, 0:03: a duration as people read it."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def too_long(name: str, seconds: float, max_s: float) -> InputError:
    return InputError(f"{name} is {span(seconds)} long; the limit is {span(max_s)}")


def _detail(exc: BaseException, path: Path) -> str:
    """A decoder's reason without the path it quotes."""
    text = getattr(exc, "error_string", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = without_paths(str(text).replace(str(path), "")).replace("''", "")
    text = " ".join(text.split()).strip(" :.")
    return (text[len("Error :"):].strip() if text.startswith("Error :") else text)[:200]  # libsndfile's prefix


def _open_av(path: Path):
    import av

    return av.open(str(path), metadata_errors="ignore",
                   options={"protocol_whitelist": "file", "format_whitelist": DEMUXERS})


def _audio_stream(container, name: str):
    import av

    if not container.streams.audio:
        pictures = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if pictures:
            raise InputError(f"{name} has no audio track")
        raise Undecodable(name, "it holds no audio stream")
    return container.streams.audio[0]


def probe(path: str | Path, name: str | None = None) -> AudioInfo:
    """What the container says (rate, channels, duration), checked, without decoding a sample."""
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise InputError(f"{name}: file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{name}: the file is empty")
    info = _probe_soundfile(path) or _probe_av(path, name)
    low, high = SAMPLE_RATES
    if not low <= info.sample_rate <= high:
        raise InputError(f"{name}: the audio claims a sample rate of {info.sample_rate:,} Hz; "
                         f"accepted rates are {low:,}-{high:,} Hz")
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise InputError(f"{name}: the audio claims {info.channels} channels; the limit is {MAX_CHANNELS}")
    return info


def _probe_soundfile(path: Path) -> AudioInfo | None:
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            rate, channels, frames, fmt, subtype = f.samplerate, f.channels, f.frames, f.format, f.subtype
    except Exception:  # noqa: BLE001 - not a format libsndfile reads (or damaged): PyAV tries
        return None
    if frames == 0:  # a header with no samples, or a stream libsndfile cannot count: PyAV looks too
        return None
    exact = fmt in _EXACT and 0 < frames < 2 ** 62
    duration = frames / rate if rate > 0 and 0 <= frames < 2 ** 62 else None
    return AudioInfo(duration, rate, channels, subtype, fmt, "soundfile", False, exact)


def _probe_av(path: Path, name: str) -> AudioInfo:
    import av

    try:
        with _open_av(path) as container:
            stream = _audio_stream(container, name)
            ctx = stream.codec_context
            if ctx is None:
                raise Undecodable(name, "its audio codec is not one FFmpeg decodes")
            rate, channels = int(ctx.sample_rate or 0), int(ctx.channels or 0)
            if rate <= 0 or channels <= 0:
                raise Undecodable(name, "its audio stream declares no sample rate or channels")
            duration = None
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000
            fmt = container.format.name
            has_video = any(not s.disposition & av.stream.Disposition.attached_pic for s in container.streams.video)
            exact = duration is not None and any(d in fmt.split(",") for d in _EXACT_AV)
            return AudioInfo(duration, rate, channels, ctx.name, fmt, "pyav", has_video, exact)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - av.error.*: not a container FFmpeg reads here, or damaged
        raise Undecodable(name, _detail(exc, path)) from None


def _to_float(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        if info.min == 0:  # unsigned 8-bit: centred
            return ((x.astype(np.float32) - (info.max + 1) / 2) / ((info.max + 1) / 2)).astype(np.float32)
        return (x.astype(np.float32) / np.float32(-info.min)).astype(np.float32)
    return x.astype(np.float32, copy=False)


def _mono(x: np.ndarray) -> np.ndarray:
    """(samples, channels) of any sample type -> mono float32 in [-1, 1] (NaN and inf made safe)."""
    x = _to_float(x)
    x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def _sf_pieces(path: Path, name: str, info: AudioInfo, start: float, duration: float | None, block_s: float):
    """(rate, mono samples) from libsndfile, from `start` for `duration` seconds."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        rate = f.samplerate
        skip = int(round(start * rate))
        if skip and f.seekable():
            f.seek(min(skip, max(f.frames, 0)))
            skip = 0
        left = -1 if duration is None else int(round(duration * rate)) + skip
        size = max(1, int(rate * block_s))
        while left != 0:  # (not f.blocks(): after a short read it hands on the rest of its last buffer again)
            block = f.read(size if left < 0 else min(size, left), dtype="float32", always_2d=True)
            if not len(block):
                break
            left = left if left < 0 else left - len(block)
            if skip:
                block, skip = block[skip:], max(0, skip - len(block))
            if len(block):
                yield rate, _mono(block)


def _av_frame(frame) -> np.ndarray:
    """A decoded frame -> (samples, channels)."""
    x = frame.to_ndarray()
    channels = max(1, frame.layout.nb_channels)
    return x.reshape(channels, -1).T if frame.format.is_planar else x.reshape(-1, channels)


def _av_pieces(path: Path, name: str, info: AudioInfo, start: float, duration: float | None, block_s: float):
    """(rate, mono samples) from PyAV's first audio stream, from `start` for `duration` seconds
    (seeking to the packet before `start`, then dropping samples to the exact time)."""
    with _open_av(path) as container:
        stream = _audio_stream(container, name)
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        end = None if duration is None else start + duration
        t = None  # where the next sample lies in the file, in seconds
        for packet in container.demux(stream):
            for frame in packet.decode():
                rate = frame.sample_rate
                x = _av_frame(frame)
                if t is None:
                    t = float(frame.pts * frame.time_base) if start > 0 and frame.pts is not None else 0.0
                t0, t = t, t + len(x) / rate
                if start > t0:
                    x = x[int(round((start - t0) * rate)):]
                    t0 = start
                if end is not None and t > end:
                    x = x[:max(0, int(round((end - t0) * rate)))]
                if len(x):
                    yield rate, _mono(x)
                if end is not None and t >= end:
                    return


def blocks(path: str | Path, rate: int | None = 16_000, *, name: str | None = None, max_s: float | None = None,
           start: float = 0.0, duration: float | None = None, block_s: float = BLOCK_S, cancel=None,
           info: AudioInfo | None = None) -> Iterator[np.ndarray]:
    """Mono float32 blocks of about `block_s` seconds at `rate` (None: the file's own rate) of
    `path` from `start`, for `duration` seconds (None: to the end). A file longer than `max_s`
    is refused before decoding when its container says so, else as soon as the decoded audio
    passes the limit. `cancel` (anything with .cancelled) is checked before each block. Read to
    its end, a stream much shorter than its container declares is refused as truncated."""
    from engine.speech.audio import StreamResampler
    from generators.base import check

    path = Path(path)
    name = name or path.name
    check(cancel)
    info = info or probe(path, name)
    if max_s is not None and info.duration_s is not None and info.duration_s > max_s:
        raise too_long(name, info.duration_s, max_s)
    pieces = (_sf_pieces if info.reader == "soundfile" else _av_pieces)(path, name, info, start, duration, block_s)
    resampler, src_rate, out_rate = None, None, rate
    pending, n_pending, n_src = [], 0, 0.0  # output not yet handed on; source seconds decoded
    try:
        while True:
            try:
                got = next(pieces, None)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - LibsndfileError mid-file, av.error.*, a torn packet
                raise Undecodable(name, _detail(exc, path)) from None
            if got is None or got[0] != src_rate:  # the end, or the rate changed mid-stream (chained MP3s)
                if resampler is not None:
                    tail = resampler(np.zeros(0, np.float32), last=True)
                    pending.append(tail)
                    n_pending += len(tail)
                if got is None:
                    break
                src_rate = got[0]
                out_rate = rate or out_rate or src_rate
                resampler = StreamResampler(src_rate, out_rate)
            x = got[1]
            n_src += len(x) / src_rate
            if max_s is not None and start + n_src > max_s + SLACK_S:
                raise InputError(f"{name} is longer than the limit of {span(max_s)}") if info.duration_s is None else \
                    Undecodable(name, f"it holds more than the {span(info.duration_s)} its header declares, "
                                      f"and more than the limit of {span(max_s)}")
            y = resampler(x)
            pending.append(y)
            n_pending += len(y)
            if n_pending >= block_s * out_rate:
                out = np.concatenate(pending)
                pending, n_pending = [], 0
                yield out
                check(cancel)
        if n_pending:
            yield np.concatenate(pending)
    finally:
        pieces.close()
    whole = start == 0 and duration is None
    if start == 0 and n_src == 0:
        if info.duration_s:
            raise Undecodable(name, "no sound could be decoded from it")
        raise InputError(f"{name}: the audio holds no samples")
    if whole and info.exact and info.duration_s and n_src < info.duration_s - max(0.5, 0.05 * info.duration_s):
        raise Undecodable(name, f"its sound ends at {n_src:.1f} s of the {info.duration_s:.1f} s its header declares")


def decode(path: str | Path, rate: int | None = 16_000, *, name: str | None = None, max_s: float | None = None,
           start: float = 0.0, duration: float | None = None, block_s: float = BLOCK_S, cancel=None,
           info: AudioInfo | None = None) -> np.ndarray:
    """All of `blocks` in one array (so at most `max_s` or `duration` seconds at `rate`)."""
    out = list(blocks(path, rate, name=name, max_s=max_s, start=start, duration=duration, block_s=block_s,
                      cancel=cancel, info=info))
    return np.concatenate(out) if out else np.zeros(0, np.float32)
