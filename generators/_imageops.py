"""Pixel helpers for the OpenCV image editor: loading, colours, tone, text,
a classical subject mask (grabCut) and recolouring.

Images travel as (rgb, alpha): an HxWx3 uint8 array in RGB order and an HxW
uint8 alpha channel or None (opaque).
"""
from __future__ import annotations

import re
import unicodedata
import warnings
from pathlib import Path

import cv2
import numpy as np

from .base import RequestError

MAX_PIXELS = 100_000_000
MAX_SIDE = 8192

COLORS = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (250, 220, 30), "green": (40, 170, 60),
    "blue": (30, 90, 230), "purple": (128, 40, 170), "pink": (255, 105, 180), "brown": (130, 80, 40),
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "grey": (128, 128, 128),
    "cyan": (0, 220, 230), "magenta": (230, 0, 200), "teal": (0, 128, 128), "gold": (230, 180, 20),
}


def parse_color(value) -> tuple[int, int, int]:
    """A colour name from COLORS or #rrggbb / #rgb -> (r, g, b)."""
    text = str(value or "").strip().lower()
    if not text:
        raise RequestError("recolor needs a colour (a name like purple, or #rrggbb)")
    if text in COLORS:
        return COLORS[text]
    m = re.fullmatch(r"#?([0-9a-f]{6}|[0-9a-f]{3})", text)
    if m:
        h = m.group(1) if len(m.group(1)) == 6 else "".join(c * 2 for c in m.group(1))
        return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))
    names = ", ".join(k for k in COLORS if k != "grey")
    raise RequestError(f"I don't know the colour {value!r}; use one of {names}, or #rrggbb")


# --- loading --------------------------------------------------------------------

def load_image(path: Path):
    """Read an image file -> (rgb, alpha|None), honouring EXIF orientation."""
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise RequestError(f"could not read the image: {path.name} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise RequestError(f"the image is too large to edit ({w}x{h}, "
                                       f"{w * h / 1e6:.0f} megapixels; the limit is 100)")
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return _to_arrays(img)
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError("the image is too large to edit (the limit is 100 megapixels)") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise RequestError(f"could not read the image {path.name}: it is damaged or not an image") from exc


def _to_arrays(img):
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F" and top <= 1.0:
            top = 1.0
        gray = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)), None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        arr = np.asarray(img.convert("RGBA"))
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))), None


def encode_png(rgb, alpha) -> bytes:
    if alpha is None:
        arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    else:
        arr = cv2.cvtColor(np.dstack([rgb, alpha]), cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


# --- tone -------------------------------------------------------------------------

def _u8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian(img, sigma: float):
    """Gaussian blur; large radii go through a smaller copy to stay fast."""
    if sigma <= 0:
        return img.copy()
    h, w = img.shape[:2]
    if sigma <= 8 or min(h, w) < 32:
        return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    f = min(sigma / 4.0, min(h, w) / 16.0)
    small = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / f, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def luma(rgb):
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def brightness(rgb, pct):
    return _u8(rgb.astype(np.float32) * (1 + pct / 100.0))


def contrast(rgb, pct):
    mean = float(luma(rgb).mean())
    return _u8(mean + (rgb.astype(np.float32) - mean) * (1 + pct / 100.0))


def saturation(rgb, pct):
    gray = luma(rgb).astype(np.float32)[..., None]
    return _u8(gray + (rgb.astype(np.float32) - gray) * (1 + pct / 100.0))


def hue_shift(rgb, degrees):
    hsv = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + degrees) % 360.0
    return _u8(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0)


def sharpen(rgb, strength, sigma):
    f = rgb.astype(np.float32)
    return _u8(f + strength * (f - gaussian(f, sigma)))


def grayscale(rgb):
    return cv2.cvtColor(luma(rgb), cv2.COLOR_GRAY2RGB)


# --- text -----------------------------------------------------------------------

FONT = cv2.FONT_HERSHEY_DUPLEX


def draw_text(rgb, text, position="bottom"):
    """White text with a black outline, centred, in a band at the top/center/bottom,
    sized from the image width (wrapped onto more lines when long)."""
    plain = unicodedata.normalize("NFKD", str(text or "")).encode("ascii", "ignore").decode()
    plain = " ".join(plain.split())
    if not plain:
        if str(text or "").strip():
            raise RequestError("the caption has no letters I can draw (only plain Latin text is supported)")
        raise RequestError("the text to write is empty; say what it should read")
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    (_, th1), _ = cv2.getTextSize("Hg", FONT, 1.0, 1)
    scale = max(0.2, min(w / 14.0, h / 8.0) / th1)  # ~1/14 of the width per line

    def layout(s):
        thick = max(1, round(s * 2.2))
        outline = thick + max(2, round(s * 1.4))
        lines, cur = [], ""
        for word in plain.split():
            cand = f"{cur} {word}".strip()
            if cur and cv2.getTextSize(cand, FONT, s, outline)[0][0] > 0.9 * w:
                lines.append(cur)
                cur = word
            else:
                cur = cand
        lines.append(cur)
        return thick, outline, lines

    for _ in range(20):
        thick, outline, lines = layout(scale)
        widest = max(cv2.getTextSize(ln, FONT, scale, outline)[0][0] for ln in lines)
        line_h = cv2.getTextSize("Hg", FONT, scale, outline)[0][1] + outline
        block = line_h * len(lines) + int(0.3 * line_h) * (len(lines) - 1)
        if (widest <= 0.9 * w and block <= 0.45 * h) or scale <= 0.2:
            break
        scale = max(0.2, scale * min(0.9 * w / max(widest, 1), 0.45 * h / max(block, 1), 0.95))
    margin = max(2, int(0.04 * h))
    y0 = {"top": margin, "center": (h - block) // 2, "bottom": h - margin - block}[position or "bottom"]
    for i, ln in enumerate(lines):
        (lw, lh), _ = cv2.getTextSize(ln, FONT, scale, thick)
        x = (w - lw) // 2
        base = y0 + i * (line_h + int(0.3 * line_h)) + lh + outline // 2
        cv2.putText(out, ln, (x, base), FONT, scale, (0, 0, 0), outline, cv2.LINE_AA)
        cv2.putText(out, ln, (x, base), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


# --- subject mask and recolouring ---------------------------------------------------

def subject_mask(rgb):
    """Foreground estimate in [0, 1] (float32, HxW): grabCut from a centred rectangle."""
    h, w = rgb.shape[:2]
    if min(h, w) < 16:
        raise RequestError("the image is too small to separate a subject from its background")
    f = min(1.0, 320.0 / max(h, w))
    sw, sh = max(16, round(w * f)), max(16, round(h * f))
    small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    small = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    mx, my = max(1, round(sw * 0.08)), max(1, round(sh * 0.08))
    mask = np.zeros((sh, sw), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(small, mask, (mx, my, sw - 2 * mx, sh - 2 * my), bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
    except cv2.error as exc:
        raise RequestError("I couldn't separate a subject from the background in this image") from exc
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if fg.sum() < 0.005 * sw * sh or fg.mean() > 0.98:
        raise RequestError("I couldn't separate a subject from the background in this image")
    soft = fg.astype(np.float32)
    if (sw, sh) != (w, h):
        soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
    soft = cv2.GaussianBlur(soft, (0, 0), max(0.7, 0.6 / f))
    return np.clip(soft, 0, 1)


def blur_background(rgb, mask, sigma):
    """Blur only what lies outside the subject (a mask-weighted blur, so the subject
    does not bleed into the background), then composite the sharp subject on top."""
    m = mask.astype(np.float32)[..., None]
    bg = 1.0 - m
    num = gaussian(rgb.astype(np.float32) * bg, sigma)
    den = gaussian(np.ascontiguousarray(bg[..., 0]), sigma)[..., None]
    plain = gaussian(rgb.astype(np.float32), sigma)
    blurred = np.where(den > 1e-3, num / np.maximum(den, 1e-3), plain)
    return _u8(rgb * m + blurred * bg)


def sky_mask(rgb):
    """Pixels in the upper part that are blue-ish or bright and connected to the top edge."""
    h, w = rgb.shape[:2]
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hh, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blueish = (hh >= 85) & (hh <= 135) & (s > 40) & (v > 60)
    bright = (v > 170) & (s < 60)
    cand = (blueish | bright).astype(np.uint8)
    cand[int(np.ceil(0.75 * h)):] = 0
    n, labels = cv2.connectedComponents(cand, connectivity=8)
    top = np.unique(labels[0][cand[0] > 0])
    mask = np.isin(labels, top[top > 0]).astype(np.float32)
    if mask.sum() < 0.01 * h * w:
        raise RequestError("I couldn't find any sky (a blue or bright area along the top) to recolour")
    return np.minimum(mask, cv2.GaussianBlur(mask, (0, 0), 1.5))


def recolor_region(rgb, mask, color):
    """Move the masked pixels to the colour's hue (and saturation), keeping their lightness;
    for black/white/gray the lightness moves most of the way to the colour's."""
    f = rgb.astype(np.float32) / 255.0
    hls = cv2.cvtColor(f, cv2.COLOR_RGB2HLS)
    th, tl, ts = cv2.cvtColor(np.array([[color]], np.float32) / 255.0, cv2.COLOR_RGB2HLS)[0, 0]
    new = hls.copy()
    new[..., 0] = th
    new[..., 2] = ts
    if ts < 0.1:
        new[..., 1] = 0.3 * hls[..., 1] + 0.7 * tl
    out = cv2.cvtColor(new, cv2.COLOR_HLS2RGB)
    m = mask[..., None]
    mixed = _u8((f * (1 - m) + out * m) * 255.0)
    return np.where(m > 0, mixed, rgb)


def tint(rgb, color, weight=0.25):
    return _u8(rgb.astype(np.float32) * (1 - weight) + np.array(color, np.float32) * weight)
