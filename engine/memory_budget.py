"""A memory budget per request: what decoding one attachment may allocate above the resting RSS.

A home server runs the assistant next to other programs, so one request must not take
gigabytes: a 7999x7999 RGBA PNG inside the pixel limit, 20 minutes of MP3 or an
8000x8000 video each added 1.2-1.4 GB (issue 25). The decoders size their buffers from
what a header says, so the cost of a decode is known before it starts:

- images: one full decode at most (PNG, GIF, WebP, BMP: the decoders have no reduced
  mode), reduced to the side perception uses in strips, never copied at full size; a
  JPEG is decoded at 1/2..1/8 scale (PIL's `draft`) when that is enough;
- video: frames decoded one at a time (single-threaded when a frame is large, so no
  frames pile up in decoder threads) and scaled down in the converter, never turned
  into a full-size RGB copy;
- audio: read in blocks (engine/speech/decode.py), so its cost is one block; Whisper's
  features of a long recording are made a minute at a time (engine/speech/features.py);
- OCR looks at the picture at most `ocr_side` pixels long (its detector's memory grows
  with the pixels it sees).

`check` refuses a file whose estimated decode passes the budget, with an InputError that
names the file and the limit, before anything is allocated. The budget is the config's
`max_request_memory_mb` (--max-request-memory-mb), set once when the engine starts.
"""
from __future__ import annotations

import os

from engine.errors import InputError

DEFAULT_MB = 768
MAX_PIXELS = 64_000_000  # larger images and video frames are refused as decompression bombs
WORK_SIDE = 2048  # the longest side image perception works at (ImagePerception.max_side)
_limit = DEFAULT_MB * 1_000_000

# bytes per pixel of an image as PIL holds it in memory (every multi-band mode uses 4)
_PIL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2, "BGR;16": 2}
# bytes per pixel of a decoded video frame by pixel format family (what FFmpeg's decoder holds)
_FRAME_BYTES = (("gray", 1), ("yuv420p1", 3), ("yuv422p1", 4), ("yuv444p1", 6), ("yuv420", 1.5), ("yuvj420", 1.5),
                ("nv12", 1.5), ("yuv422", 2), ("yuvj422", 2), ("yuyv", 2), ("uyvy", 2), ("yuv444", 3),
                ("yuvj444", 3), ("rgb24", 3), ("bgr24", 3), ("gbrp", 3))
INTRA_CODECS = {"mjpeg", "jpeg2000", "png", "rawvideo", "prores", "ffv1", "huffyuv", "utvideo", "qtrle", "dnxhd",
                "gif", "bmp", "tiff", "webp", "mjpegb", "ljpeg", "jpegls", "cfhd"}
REFS = 8  # frames an inter codec's decoder may hold (references and reordering: H.264/HEVC DPBs, VP9/AV1 slots)


OCR_BYTES_PER_PIXEL = 260  # rapidocr (detector + recogniser) at its peak: ~490 MB for 1468x1468, ~540 at 2000


def ocr_side(most: int) -> int:
    """The longest side OCR may look at: its models' activations grow with the pixels they see,
    so within 70% of the budget (1170 px at 512 MB, 1438 at the default 768, 1660 at 1 GB), never
    under 640 px."""
    return max(640, min(most, int((0.7 * _limit / OCR_BYTES_PER_PIXEL) ** 0.5)))


def check_frame(name: str, width: int, height: int) -> None:
    """Video frames share the image pixel budget (on upload and in the video adapter's scan)."""
    if width * height > MAX_PIXELS:
        raise InputError(f"{name} has video frames of {width}x{height} pixels; the limit is "
                         f"{MAX_PIXELS // 1_000_000} megapixels a frame")


def configure(mb: int | float) -> None:
    """The budget for each request from now on (the engine calls this with the config's value)."""
    global _limit
    _limit = int(float(mb) * 1_000_000)


def limit() -> int:
    return _limit


def check(name: str, what: str, need: int) -> None:
    """InputError when decoding `what` of `name` needs more than the budget."""
    if need > _limit:
        raise InputError(f"{name}: {what} needs about {need / 1e6:,.0f} MB of memory to decode; the limit is "
                         f"{_limit / 1e6:,.0f} MB a request (raise it with --max-request-memory-mb)")


def pil_bytes(width: int, height: int, mode: str) -> int:
    return width * height * _PIL_BYTES.get(mode, 4)


def jpeg_scale(width: int, height: int, side: int) -> int:
    """The divisor PIL's draft picks for a JPEG asked to fit `side` (1, 2, 4 or 8)."""
    scale = 1
    while scale < 8 and max(width, height) // (scale * 2) >= side:
        scale *= 2
    return scale


def image_need(width: int, height: int, mode: str, fmt: str, side: int = WORK_SIDE) -> int:
    """Bytes a reduced load of the picture allocates at its peak: the decoded picture (a JPEG at
    its draft scale), one strip being converted, and the reduced result."""
    if fmt == "JPEG":
        s = jpeg_scale(width, height, side)
        width, height = -(-width // s), -(-height // s)
    f = min(1.0, side / max(width, height, 1))
    small = 4 * max(1, round(width * f)) * max(1, round(height * f))
    strip = 4 * width * min(height, 256) * 3  # the strip, its RGBA->RGB copies
    return pil_bytes(width, height, mode) + strip + 3 * small


def check_image(name: str, width: int, height: int, mode: str, fmt: str, side: int = WORK_SIDE) -> int:
    need = image_need(width, height, mode, fmt, side)
    check(name, f"the {width}x{height} {fmt or 'image'} ({mode})", need)
    return need


def frame_bytes(width: int, height: int, pix_fmt: str | None) -> float:
    fmt = (pix_fmt or "").lower()
    per = next((b for prefix, b in _FRAME_BYTES if fmt.startswith(prefix)), 4)
    if fmt.endswith(("le", "be")) and per < 3 and not fmt.startswith("gray"):
        per *= 2  # 10/12-bit planar formats store two bytes a sample
    return width * height * per


def video_threads(width: int, height: int, pix_fmt: str | None, codec: str) -> int:
    """Decoder threads for frames of this size: each frame thread holds frames of its own, so a
    frame over 1/32 of the budget is decoded by one thread."""
    if frame_bytes(width, height, pix_fmt) * 32 > _limit:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def video_need(width: int, height: int, pix_fmt: str | None, codec: str, threads: int = 1) -> int:
    """Bytes decoding a video holds at once: the frames the decoder keeps (one for intra-only
    codecs, references for the others, per decoding thread), the converted small copy."""
    held = 2 if (codec or "").lower() in INTRA_CODECS else REFS
    return int(frame_bytes(width, height, pix_fmt) * (held + threads - 1)) + 16_000_000


def check_video(name: str, width: int, height: int, pix_fmt: str | None, codec: str, threads: int = 1) -> None:
    need = video_need(width, height, pix_fmt, codec, threads)
    check(name, f"a {width}x{height} {codec or 'video'} frame ({pix_fmt or 'unknown format'})", need)
