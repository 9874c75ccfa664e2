"""What colours an image holds, in words: dominant colours by k-means on a thumbnail, each
named from a small table by the nearest prototype in CIE Lab. Pure numpy, no model: the
image adapter's one stage that needs nothing downloaded or loaded."""
from __future__ import annotations

import numpy as np
from PIL import Image

# A small colour-name table (a name may have two prototypes); nearest in CIE Lab wins.
COLOR_NAMES = [
    ("black", (0, 0, 0)), ("dark gray", (70, 70, 70)), ("gray", (128, 128, 128)),
    ("light gray", (195, 195, 195)), ("white", (255, 255, 255)),
    ("red", (255, 0, 0)), ("red", (200, 30, 35)), ("dark red", (128, 0, 0)), ("pink", (255, 160, 190)),
    ("orange", (255, 140, 0)), ("brown", (130, 80, 40)), ("brown", (90, 55, 35)), ("tan", (205, 160, 120)), ("beige", (230, 215, 180)),
    ("yellow", (255, 225, 0)), ("olive", (128, 128, 0)), ("green", (0, 200, 0)), ("green", (40, 150, 60)),
    ("dark green", (0, 90, 30)), ("teal", (0, 128, 128)), ("cyan", (0, 220, 230)),
    ("light blue", (140, 190, 235)), ("blue", (0, 0, 255)), ("blue", (40, 90, 210)), ("navy", (0, 0, 110)),
    ("purple", (120, 50, 160)), ("lavender", (190, 160, 230)), ("magenta", (230, 0, 200)),
]


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIE Lab (D65), numpy only."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_NAMES = [n for n, _ in COLOR_NAMES]
_NAME_LAB = _lab(np.array([c for _, c in COLOR_NAMES], np.uint8))


def color_name(rgb) -> str:
    return _NAMES[int(np.argmin(((_NAME_LAB - _lab(np.asarray(rgb, np.uint8))) ** 2).sum(-1)))]


def kmeans_colors(rgb: np.ndarray, k: int = 5, iters: int = 20) -> list[dict]:
    """Dominant colours of an RGB image: k-means (k-means++ init, fixed seed) on a
    64x64 thumbnail, clusters merged by name, shares in % of the area."""
    px = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BOX), np.float64).reshape(-1, 3)
    rng = np.random.default_rng(0)
    centres = [px[rng.integers(len(px))]]
    for _ in range(1, k):
        d = np.min([((px - c) ** 2).sum(1) for c in centres], axis=0)
        if d.sum() <= 0:
            break
        centres.append(px[rng.choice(len(px), p=d / d.sum())])
    centres = np.array(centres)
    for _ in range(iters):
        assign = np.argmin(((px[:, None, :] - centres[None]) ** 2).sum(-1), 1)
        new = np.array([px[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(len(centres))])
        if np.allclose(new, centres):
            break
        centres = new
    counts = np.bincount(assign, minlength=len(centres))
    merged: dict[str, dict] = {}
    for j in np.argsort(-counts):
        if counts[j] == 0:
            continue
        rgb_c = np.clip(np.round(centres[j]), 0, 255).astype(np.uint8)
        name = color_name(rgb_c)
        entry = merged.setdefault(name, {"name": name, "hex": "#%02x%02x%02x" % tuple(int(v) for v in rgb_c), "share": 0.0})
        entry["share"] += 100.0 * counts[j] / len(px)
    out = sorted(merged.values(), key=lambda e: -e["share"])
    for e in out:
        e["share"] = round(float(e["share"]), 1)
    return out
