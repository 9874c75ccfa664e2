"""A video's pictures, one decoded frame at a time, scaled down as they are converted.

    with VideoFrames(path, name) as video:      # header checked: pixel limit, memory budget
        for t, frame in video.frames(every=step, side=640):   # BGR arrays, longest side <= 640
            ...

OpenCV's VideoCapture kept a full-size BGR copy of every frame it handed on, next to the
decoder's own frame and the copy `retrieve` returns, with as many decoder threads as
cores each holding frames: an 8000x8000 video added ~0.5-1.3 GB (issue 25). Here PyAV
(FFmpeg's libraries, in process, the demuxers engine/speech/decode.py allows) decodes
with one thread when a frame is large (engine/memory_budget.py), and each frame wanted is
converted straight from the decoder's YUV to a small BGR picture by FFmpeg's scaler: no
full-size RGB copy exists. Frames not wanted are decoded (a codec needs them) but never
converted. A damaged packet is skipped, as OpenCV did; a stream with no decodable frame
is an InputError naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from engine import memory_budget
from engine.memory_budget import check_frame
from engine.errors import InputError

MAX_BAD_PACKETS = 64  # damaged packets in a row before the rest of the stream is given up


class VideoFrames:
    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from engine.speech.decode import _open_av

        self.path = Path(path)
        self.name = name or self.path.name
        try:
            self.container = _open_av(self.path)
        except Exception:  # noqa: BLE001 - av.error.*: not a container FFmpeg reads here, or damaged
            raise InputError(f"could not read the video {self.name}: it is damaged or not a video format") from None
        try:
            import av

            pictures = [s for s in self.container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            if not pictures:
                raise InputError(f"could not read the video {self.name}: it has no video stream")
            self.stream = pictures[0]
            ctx = self.stream.codec_context
            if ctx is None:
                raise InputError(f"could not read the video {self.name}: its codec is not supported")
            self.width, self.height = int(ctx.width or 0), int(ctx.height or 0)
            check_frame(self.name, self.width, self.height)
            self.size = (self.width, self.height)  # of the last frame decoded
            pix_fmt, self.codec = ctx.pix_fmt, ctx.name
            threads = memory_budget.video_threads(self.width, self.height, pix_fmt, self.codec)
            memory_budget.check_video(self.name, self.width, self.height, pix_fmt, self.codec, threads)
            ctx.thread_count = threads
            ctx.thread_type = "FRAME" if threads > 1 else "SLICE"
            rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
            self.fps = float(rate) if rate and 0 < float(rate) <= 1000 else 0.0
            self.frame_count = int(self.stream.frames or 0)
            if self.stream.duration and self.stream.time_base:
                self.duration_s = float(self.stream.duration * self.stream.time_base)
            else:
                self.duration_s = (self.container.duration or 0) / 1_000_000
        except BaseException:
            self.container.close()
            raise

    def __enter__(self) -> "VideoFrames":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def frames(self, every: int = 1, side: int | None = 640, cancel=None) -> Iterator[tuple[float, np.ndarray]]:
        """(seconds, BGR frame with its longest side at most `side`) for every `every`-th frame."""
        from generators.base import check

        index, bad, fps = -1, 0, self.fps or 25.0
        for packet in self.container.demux(self.stream):
            try:
                decoded = packet.decode()
            except Exception:  # noqa: BLE001 - av.error.*: a torn packet; the next may decode
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    return
                continue
            bad = 0
            for frame in decoded:
                index += 1
                if index % 16 == 0:
                    check(cancel)
                check_frame(self.name, frame.width, frame.height)  # MJPEG frames may grow mid-stream
                self.size = (frame.width, frame.height)
                if index % every:
                    continue
                t = float(frame.time) if frame.time is not None and frame.time >= 0 else index / fps
                yield t, self.convert(frame, side)

    @staticmethod
    def convert(frame, side: int | None) -> np.ndarray:
        w, h = frame.width, frame.height
        if side is not None and max(w, h) > side:
            f = side / max(w, h)
            w, h = max(1, round(w * f)), max(1, round(h * f))
        return frame.reformat(width=w, height=h, format="bgr24", interpolation="AREA").to_ndarray()

    def first(self, side: int | None = 640) -> np.ndarray:
        """The first decodable frame, or an InputError (the video's decode proven sound)."""
        for _, frame in self.frames(side=side):
            return frame
        raise InputError(f"could not read the video {self.name}: no frame could be decoded")
