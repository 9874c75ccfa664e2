"""A picture reduced to the size perception works at, within the request's memory budget.

    small = shrink(im, 2048)   # upright handled by the caller; RGB on white, longest side <= 2048

The decoders of PNG, GIF, WebP and BMP have no reduced mode, so a big one is decoded once
at full size; everything after that works a strip of rows at a time: each strip is cropped
(a copy of those rows only), its transparency laid on white, turned to RGB and resampled
(LANCZOS, with `box`, so the strips join into exactly the picture one whole-image resize
gives). The old path made four full-size copies (EXIF transpose, RGBA, a white background,
the composite): a 7999x7999 RGBA PNG peaked at ~1 GB above the resting RSS; this is one
decode plus a strip. JPEGs are decoded reduced before they get here (PIL's draft).
"""
from __future__ import annotations

import math

from PIL import Image

STRIP_ROWS = 64  # output rows made per strip
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # EXIF orientation -> what makes the picture upright


def fitted(width: int, height: int, side: int) -> tuple[int, int]:
    if max(width, height) <= side:
        return width, height
    f = side / max(width, height)
    return max(1, round(width * f)), max(1, round(height * f))


def on_white(im: Image.Image) -> Image.Image:
    """RGB, with any transparency laid on white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def shrink(im: Image.Image, side: int) -> Image.Image:
    """`im` (loaded) as RGB on white with its longest side at most `side`, made strip by strip."""
    w, h = im.size
    out_w, out_h = fitted(w, h, side)
    if (out_w, out_h) == (w, h):
        return on_white(im)
    sy = h / out_h
    margin = math.ceil(3 * max(sy, w / out_w)) + 2  # LANCZOS reaches 3 output pixels each side
    out = Image.new("RGB", (out_w, out_h))
    for oy0 in range(0, out_h, STRIP_ROWS):
        oy1 = min(out_h, oy0 + STRIP_ROWS)
        y0, y1 = oy0 * sy, oy1 * sy
        c0, c1 = max(0, math.floor(y0) - margin), min(h, math.ceil(y1) + margin)
        strip = on_white(im.crop((0, c0, w, c1)))
        out.paste(strip.resize((out_w, oy1 - oy0), Image.Resampling.LANCZOS, box=(0, y0 - c0, w, y1 - c0)), (0, oy0))
    return out


def upright(im: Image.Image, orientation: int) -> Image.Image:
    method = TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im
