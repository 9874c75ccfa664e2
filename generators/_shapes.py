"""Shape parameters, colours and rule-based object recipes for the trimesh 3D backend.

Coordinates are glTF's: y is up, a unit is about a metre. Every recipe is built
standing on y=0, centred on x=z=0; `shapes_from_prompt` lays objects out side by
side along x, puts "X on Y" on top of Y and "X under Y" beneath it.
Pure numpy; no trimesh here.
"""
from __future__ import annotations

import math
import re

import numpy as np

from generators.base import RequestError

COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (245, 215, 50), "green": (60, 170, 70),
    "blue": (40, 90, 220), "purple": (130, 60, 180), "pink": (245, 130, 180), "brown": (120, 75, 40),
    "black": (20, 20, 20), "white": (245, 245, 245), "gray": (128, 128, 128), "grey": (128, 128, 128),
    "cyan": (0, 200, 220), "magenta": (220, 0, 200), "teal": (0, 128, 128), "gold": (212, 175, 55),
    "silver": (192, 192, 200),
}
DEFAULT_COLOR = (180, 180, 180)


def parse_color(text: str | None) -> tuple[int, int, int]:
    """A colour name ('red', 'light blue', 'dark green') or #rrggbb -> (r, g, b)."""
    if text is None or not str(text).strip():
        return DEFAULT_COLOR
    t = " ".join(str(text).lower().split())
    if re.fullmatch(r"#[0-9a-f]{6}", t):
        return tuple(int(t[i:i + 2], 16) for i in (1, 3, 5))
    shade, _, name = t.rpartition(" ")
    if name in COLORS and shade in ("", "light", "dark"):
        rgb = np.array(COLORS[name], float)
        rgb = rgb + (255 - rgb) * 0.45 if shade == "light" else rgb * 0.55 if shade == "dark" else rgb
        return tuple(int(round(v)) for v in rgb)
    raise RequestError(f"unknown colour {text!r}; use #rrggbb or one of {', '.join(COLORS)} "
                       "(optionally 'light' or 'dark' before it)")


def rotation(s: dict) -> np.ndarray:
    """3x3 rotation from rotate_x, rotate_y, rotate_z (degrees), applied in that order about the shape's centre."""
    ax, ay, az = (math.radians(s.get(k, 0) or 0) for k in ("rotate_x", "rotate_y", "rotate_z"))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def dims(s: dict) -> dict:
    """Resolved sizes. box/plane: w h d; sphere: w h d (diameters, default 2*radius);
    cylinder/cone/capsule: r h (axis along y, h the full height); torus: r (ring) t (tube radius)."""
    shape, g = s["shape"], s.get
    r = g("radius") or (g("width") / 2 if g("width") else None)
    if shape in ("box", "plane"):
        return {"w": g("width") or 1.0, "h": g("height") or 1.0, "d": g("depth") or 1.0}
    if shape == "sphere":
        r = g("radius") or 0.5
        return {"w": g("width") or 2 * r, "h": g("height") or 2 * r, "d": g("depth") or 2 * r}
    if shape == "capsule":
        r = r or 0.25
        return {"r": r, "h": max(g("height") or 1.0, 2 * r)}
    if shape == "torus":
        r = g("radius") or 0.5
        return {"r": r, "t": (g("height") or 0.6 * r) / 2}
    return {"r": r or 0.5, "h": g("height") or 1.0}  # cylinder, cone


def half_extents(s: dict) -> np.ndarray:
    """Half sizes of the unrotated shape's bounding box."""
    d = dims(s)
    if s["shape"] in ("box", "sphere"):
        return np.array([d["w"], d["h"], d["d"]]) / 2
    if s["shape"] == "plane":
        return np.array([d["w"] / 2, 0.0, d["d"] / 2])
    if s["shape"] == "torus":
        return np.array([d["r"] + d["t"], d["t"], d["r"] + d["t"]])
    return np.array([d["r"], d["h"] / 2, d["r"]])


def shape_bounds(s: dict) -> np.ndarray:
    """[[minx, miny, minz], [maxx, maxy, maxz]] of a shape (rotated box corners: a little generous)."""
    corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)]) * half_extents(s)
    pts = corners @ rotation(s).T + [s.get("x", 0), s.get("y", 0), s.get("z", 0)]
    return np.array([pts.min(0), pts.max(0)])


def bounds_of(parts: list[dict]) -> np.ndarray:
    b = np.array([shape_bounds(p) for p in parts])
    return np.array([b[:, 0].min(0), b[:, 1].max(0)])


def move(parts: list[dict], dx=0.0, dy=0.0, dz=0.0) -> list[dict]:
    return [{**p, "x": p.get("x", 0) + dx, "y": p.get("y", 0) + dy, "z": p.get("z", 0) + dz} for p in parts]


def scale(parts: list[dict], f: float) -> list[dict]:
    keys = ("x", "y", "z", "width", "height", "depth", "radius")
    return [{**p, **{k: p[k] * f for k in keys if k in p}} for p in parts]


def grounded(parts: list[dict]) -> list[dict]:
    """Move parts so they stand on y=0, centred on x=z=0."""
    (x0, y0, z0), (x1, _, z1) = bounds_of(parts)
    return move(parts, -(x0 + x1) / 2, -y0, -(z0 + z1) / 2)


# --- recipes: colour (or None) -> parts; parts marked main take the prompt's colour ---

def _p(shape, color, x=0.0, y=0.0, z=0.0, main=False, **sizes):
    return {"shape": shape, "color": color, "x": x, "y": y, "z": z, **sizes, "_main": main}


def _single(shape, color, **sizes):
    return lambda: [_p(shape, color, main=True, **sizes)]


def _snowman():
    parts = [_p("sphere", "white", y=0.5, radius=0.5, main=True), _p("sphere", "white", y=1.27, radius=0.35, main=True),
             _p("sphere", "white", y=1.81, radius=0.25, main=True),
             _p("cone", "orange", y=1.81, z=0.36, radius=0.05, height=0.24, rotate_x=90)]
    parts += [_p("sphere", "black", x=sx, y=1.89, z=0.21, radius=0.035) for sx in (-0.09, 0.09)]
    return parts + [_p("sphere", "black", y=yy, z=0.34, radius=0.04) for yy in (1.18, 1.36)]


def _table():
    return [_p("box", "brown", y=0.75, width=1.6, height=0.1, depth=1.0, main=True)] + [
        _p("box", "brown", x=sx, y=0.35, z=sz, width=0.1, height=0.7, depth=0.1, main=True)
        for sx in (-0.7, 0.7) for sz in (-0.4, 0.4)]


def _house():
    return [_p("box", "#e8d8b0", y=0.5, width=1.4, height=1.0, depth=1.2, main=True),
            _p("box", "#a33b2b", y=1.0, width=1.05, height=1.05, depth=1.35, rotate_z=45),
            _p("box", "brown", y=0.28, z=0.605, width=0.3, height=0.55, depth=0.02),
            _p("box", "light blue", x=-0.42, y=0.62, z=0.605, width=0.26, height=0.26, depth=0.02),
            _p("box", "light blue", x=0.42, y=0.62, z=0.605, width=0.26, height=0.26, depth=0.02)]


def _tree():
    return [_p("cylinder", "brown", y=0.4, radius=0.12, height=0.8),
            _p("sphere", "green", y=1.15, radius=0.5, main=True)]


def _pinetree():
    return [_p("cylinder", "brown", y=0.2, radius=0.1, height=0.4)] + [
        _p("cone", "dark green", y=y, radius=r, height=h, main=True)
        for y, r, h in ((0.75, 0.6, 0.8), (1.15, 0.45, 0.7), (1.5, 0.3, 0.6))]


def _car():
    return [_p("box", "red", y=0.45, width=2.0, height=0.5, depth=1.0, main=True),
            _p("box", "red", x=-0.1, y=0.88, width=1.1, height=0.38, depth=0.9, main=True)] + [
        _p("cylinder", "black", x=sx, y=0.22, z=sz, radius=0.22, height=0.15, rotate_x=90)
        for sx in (-0.65, 0.65) for sz in (-0.5, 0.5)] + [
        _p("sphere", "yellow", x=1.0, y=0.5, z=sz, radius=0.07) for sz in (-0.3, 0.3)]


def _lamp():
    return [_p("cylinder", "#404040", y=0.03, radius=0.3, height=0.06),
            _p("cylinder", "#404040", y=0.66, radius=0.03, height=1.2),
            _p("sphere", "yellow", y=1.22, radius=0.1),
            _p("cone", "#f0e0b0", y=1.35, radius=0.35, height=0.4, main=True)]


def _tower():
    return [_p("cylinder", "gray", y=0.5 + i, radius=0.6 - 0.1 * i, height=1.0, main=True) for i in range(3)] + [
        _p("cone", "red", y=3.3, radius=0.5, height=0.6)]


def _lighthouse():
    parts = [_p("cylinder", "red" if i % 2 == 0 else "white", y=0.3 + 0.6 * i, radius=0.5 - 0.04 * i,
                height=0.6, main=i % 2 == 0) for i in range(4)]
    return parts + [_p("cylinder", "yellow", y=2.55, radius=0.3, height=0.3),
                    _p("cone", "red", y=2.85, radius=0.38, height=0.3, main=True)]


def _rocket():
    return [_p("cylinder", "white", y=1.0, radius=0.3, height=1.6, main=True),
            _p("cone", "red", y=2.1, radius=0.3, height=0.6),
            _p("sphere", "light blue", y=1.4, z=0.27, radius=0.1)] + [
        _p("box", "red", x=sx, y=0.25, z=sz, width=w, height=0.5, depth=d)
        for sx, sz, w, d in ((0.4, 0, 0.3, 0.04), (-0.4, 0, 0.3, 0.04), (0, 0.4, 0.04, 0.3), (0, -0.4, 0.04, 0.3))]


def _chair():
    return [_p("box", "brown", y=0.5, width=0.6, height=0.08, depth=0.6, main=True),
            _p("box", "brown", y=0.84, z=-0.27, width=0.6, height=0.6, depth=0.06, main=True)] + [
        _p("box", "brown", x=sx, y=0.23, z=sz, width=0.06, height=0.46, depth=0.06, main=True)
        for sx in (-0.25, 0.25) for sz in (-0.25, 0.25)]


def _mushroom():
    parts = [_p("cylinder", "#f0e8d8", y=0.3, radius=0.14, height=0.6),
             _p("sphere", "red", y=0.62, radius=0.45, height=0.4, main=True)]
    for a, e in ((0, 0.5), (2.1, 0.6), (4.2, 0.45), (1.0, 1.2), (3.2, 1.1), (5.2, 1.3)):  # spots on the cap
        parts.append(_p("sphere", "white", x=0.45 * math.cos(e) * math.cos(a), y=0.62 + 0.2 * math.sin(e),
                        z=0.45 * math.cos(e) * math.sin(a), radius=0.06))
    return parts


def _donut():
    return [_p("torus", "#d9a066", y=0.2, radius=0.4, height=0.36),
            _p("torus", "pink", y=0.26, radius=0.4, height=0.3, main=True)]


RECIPES = {
    "cube": _single("box", "gray"), "box": _single("box", "#c8a165"), "sphere": _single("sphere", "gray", radius=0.5),
    "ball": _single("sphere", "red", radius=0.5), "cylinder": _single("cylinder", "gray"),
    "can": _single("cylinder", "silver", radius=0.33, height=1.0),
    "pillar": _single("cylinder", "white", radius=0.25, height=2.0), "cone": _single("cone", "orange"),
    "torus": _single("torus", "gray"), "ring": _single("torus", "gold", height=0.12),
    "capsule": _single("capsule", "white"), "donut": _donut, "snowman": _snowman, "table": _table,
    "house": _house, "tree": _tree, "pinetree": _pinetree, "car": _car, "lamp": _lamp, "tower": _tower,
    "lighthouse": _lighthouse, "rocket": _rocket, "chair": _chair, "mushroom": _mushroom,
    "ground": _single("plane", "green", width=4.0, depth=4.0),
}
NOUNS = {**{k: k for k in RECIPES}, "block": "cube", "crate": "box", "orb": "sphere", "globe": "sphere",
         "tube": "cylinder", "pipe": "cylinder", "column": "pillar", "doughnut": "donut", "pill": "capsule",
         "plane": "ground", "floor": "ground", "desk": "table", "home": "house", "hut": "house",
         "cabin": "house", "cottage": "house", "spaceship": "rocket", "toadstool": "mushroom",
         "snowmen": "snowman", "tori": "torus"}
PHRASES = [(r"\b(christmas|xmas|pine|fir)( tree)?\b", "pinetree"), (r"\blight house\b", "lighthouse"),
           (r"\bsnow (man|men)\b", r"snow\1"), (r"\b(space|rocket) ?ship\b", "rocket"), (r"\bon top of\b", "on"),
           (r"\bdough nut\b", "donut")]
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10, "eleven": 11, "twelve": 12, "pair": 2, "couple": 2, "few": 3, "several": 4, "many": 5,
           "dozen": 12}
SIZES = {"big": 1.6, "large": 1.6, "huge": 2.0, "giant": 2.0, "small": 0.6, "little": 0.6, "tiny": 0.4, "mini": 0.5}
ON, UNDER = {"on", "onto", "atop", "upon", "above", "over"}, {"under", "beneath", "below", "underneath"}
MAX_COUNT, MAX_PARTS = 12, 300


def _noun(tok: str) -> tuple[str | None, bool]:
    """(recipe, plural) for a word, or (None, False)."""
    if tok in NOUNS:
        return NOUNS[tok], tok in ("snowmen", "tori")
    for cut in (1, 2):
        if tok.endswith("es"[2 - cut:]) and tok[:-cut] in NOUNS:
            return NOUNS[tok[:-cut]], True
    return None, False


def _parse(prompt: str):
    """Words -> groups [{key, count, color, size, stacked}] and relations [(child, 'on'|'under', parent)]."""
    text = prompt.lower()
    for pat, rep in PHRASES:
        text = re.sub(pat, rep, text)
    toks = re.findall(r"#[0-9a-f]{6}\b|[a-z0-9]+", text)
    groups, rels = [], []
    pend: dict = {}
    rel = None  # (kind, child index) waiting for its parent
    for i, t in enumerate(toks):
        prev = toks[i - 1] if i else ""
        shade = prev if prev in ("light", "dark") else ""
        if t in COLORS or t.startswith("#"):
            color = f"{shade} {t}".strip()
            lead = (toks[i - 2] if i >= 2 else "") if shade else prev
            if lead in ("in", "colored", "coloured", "painted", "is", "are") and groups:
                groups[-1]["color"] = color  # "a cube in red", "the ball is blue"
                continue
            pend["color"] = color
        elif t.isdigit() and 0 < int(t) < 100:
            pend["count"] = int(t)
        elif t in NUMBERS:
            pend["count"] = NUMBERS[t]
        elif t in ("a", "an", "the", "some"):
            pend["article"] = t
        elif t in SIZES:
            pend["size"] = SIZES[t]
        elif t in ("stack", "stacked", "pile", "piled", "stacking"):
            if pend or not groups:
                pend["stacked"] = True
            else:
                groups[-1]["stacked"] = True
        elif t in ON or t in UNDER:
            if groups:
                rel = ("on" if t in ON else "under", len(groups) - 1)
        elif t in ("it", "them", "this", "that") and rel and rel[1] > 0:
            rels.append((rel[1], rel[0], rel[1] - 1))
            rel = None
        else:
            key, plural = _noun(t)
            if key == "can" and not plural and not (pend or prev in ("soda", "tin", "drink", "beer", "paint")):
                key = None  # "can you ..." is a verb
            if key is None:
                continue
            same = [j for j, g in enumerate(groups) if g["key"] == key]
            if pend.get("article") == "the" and same and "count" not in pend and not plural:
                idx = same[-1]  # "the table" again: the one already there
            else:
                count = pend.get("count", 3 if plural else 1)
                groups.append({"key": key, "count": max(1, min(count, MAX_COUNT)), "color": pend.get("color"),
                               "size": pend.get("size", 1.0), "stacked": pend.get("stacked", False)})
                idx = len(groups) - 1
            if rel and rel[1] != idx:
                rels.append((rel[1], rel[0], idx))
            rel, pend = None, {}
    if rel and rel[1] > 0:  # "... with a ball on top"
        rels.append((rel[1], rel[0], rel[1] - 1))
    if pend.get("color") and groups and groups[-1]["color"] is None:  # "a cube, red"
        groups[-1]["color"] = pend["color"]
    return groups, rels


def _group_parts(g: dict) -> list[dict]:
    parts, cursor = [], 0.0
    for _ in range(g["count"]):
        item = grounded(scale(RECIPES[g["key"]](), g["size"]))
        if g["color"]:
            item = [{**p, "color": g["color"]} if p["_main"] else p for p in item]
        lo, hi = bounds_of(item)
        if g["stacked"]:
            item, cursor = move(item, dy=cursor), cursor + hi[1] - lo[1]
        else:
            item, cursor = move(item, dx=cursor - lo[0]), cursor + hi[0] - lo[0] + 0.25 * g["size"]
        parts += item
    return grounded(parts)


def shapes_from_prompt(prompt: str) -> list[dict]:
    """Rule-based scene from words: objects, colours, counts, sizes, 'on'/'under'. RequestError if none."""
    groups, rels = _parse(prompt or "")
    if not groups:
        raise RequestError("I can't tell what 3D object to build from that. I can build: "
                           + ", ".join(sorted(set(NOUNS) - {"snowmen", "tori"}))
                           + " (with colours, counts like 'three', 'big'/'small', 'on'/'under'), "
                           "or a scene from explicit shapes (box, sphere, cylinder, cone, capsule, torus, plane)")
    parts = [_group_parts(g) for g in groups]
    ground = {i for i, g in enumerate(groups) if g["key"] == "ground"}
    parent = {}
    for child, kind, par in rels:
        if child not in parent and par != child and not {child, par} & ground:
            parent[child] = (kind, par)
    for c in list(parent):  # break cycles: walk up; a loop back to c makes c a root
        seen, p = {c}, parent[c][1]
        while p in parent:
            if p in seen:
                parent.pop(c)
                break
            seen.add(p)
            p = parent[p][1]
    roots = [i for i in range(len(groups)) if i not in parent and i not in ground]
    x, placed = 0.0, {}
    for i in roots:  # side by side along x
        lo, hi = bounds_of(parts[i])
        placed[i] = move(parts[i], dx=x - lo[0])
        x += hi[0] - lo[0] + 0.5
    while ready := sorted({p for c, (k, p) in parent.items() if c not in placed and p in placed}):
        for p in ready:
            plo, phi = bounds_of(placed[p])
            for kind in ("on", "under"):
                kids = [c for c, (k, pp) in sorted(parent.items()) if pp == p and k == kind and c not in placed]
                widths = [np.ptp(bounds_of(parts[c])[:, 0]) for c in kids]
                cx = (plo[0] + phi[0]) / 2 - (sum(widths) + 0.2 * (len(kids) - 1)) / 2
                for c, w in zip(kids, widths):
                    lo, _ = bounds_of(parts[c])
                    y = phi[1] if kind == "on" else plo[1]
                    placed[c] = move(parts[c], cx - lo[0], y - lo[1], (plo[2] + phi[2]) / 2)
                    cx += w + 0.2
    scene = [p for i in sorted(placed) for p in placed[i]]
    if scene:
        (x0, _, z0), (x1, _, z1) = bounds_of(scene)
        scene = move(scene, -(x0 + x1) / 2, 0, -(z0 + z1) / 2)
    for i in sorted(ground):
        (x0, _, z0), (x1, _, z1) = bounds_of(scene) if scene else ((-1, 0, -1), (1, 0, 1))
        plane = RECIPES["ground"]()[0]
        plane.update(width=max(4.0, x1 - x0 + 2), depth=max(4.0, z1 - z0 + 2), x=(x0 + x1) / 2, y=0.0,
                     z=(z0 + z1) / 2, color=groups[i]["color"] or plane["color"])
        scene.append(plane)
    if len(scene) > MAX_PARTS:
        raise RequestError(f"that scene needs {len(scene)} shapes; the limit is {MAX_PARTS}; ask for fewer objects")
    return [{k: round(float(v), 4) if isinstance(v, (float, np.floating)) else v
             for k, v in p.items() if k != "_main"} for p in scene]
