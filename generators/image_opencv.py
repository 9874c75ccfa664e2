"""Classical image editing with OpenCV: the offline "edit_image" backend.

Operations (generators.tools.IMAGE_OP) run in order on one input image; with
no operations, `parse_instruction` derives them from the user's words. The
pixel work lives in generators._imageops; this file holds the op semantics,
the instruction parser and the backend.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from . import _imageops as ops
from .base import Backend, GenerationError, RequestError, Result, check, validate
from .registry import register
from .tools import IMAGE_OP

DEFAULT_AMOUNT = {"rotate": 90, "brightness": 30, "contrast": 30, "saturation": 30, "hue": 30,
                  "blur": 3, "sharpen": 1, "background_blur": 6}
CAN_DO = ("crop (to a square or 16:9), rotate, flip/mirror, resize, brighter/darker, contrast, saturation, "
          "hue shift, blur, sharpen, black and white, invert colours, add a caption, blur or remove the "
          "background, recolour the sky/background/subject, tint it a colour")


def _aspect(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:/x]\s*(\d+(?:\.\d+)?)\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise RequestError(f"aspect must look like 1:1 or 16:9; got {text!r}")
    return float(m.group(1)) / float(m.group(2))


def _amount(op: dict, lo: float = None, hi: float = None) -> float:
    name = op["op"]
    amount = op.get("amount")
    amount = DEFAULT_AMOUNT[name] if amount is None else amount
    if (lo is not None and amount < lo) or (hi is not None and amount > hi):
        raise RequestError(f"{name} amount must be between {lo} and {hi}; got {amount}")
    return amount


def _geometry(name, op, rgb, alpha):
    """crop/rotate/flip/resize: the same transform on the colour and the alpha planes."""
    h, w = rgb.shape[:2]
    planes = [rgb] if alpha is None else [rgb, alpha]
    if name == "crop":
        if op.get("aspect"):
            a = _aspect(op["aspect"])
            cw, ch = (max(1, round(h * a)), h) if w / h > a else (w, max(1, round(w / a)))
            cw, ch = min(cw, w), min(ch, h)
            x, y = (w - cw) // 2, (h - ch) // 2
        elif any(op.get(k) is not None for k in ("width", "height", "x", "y")):
            x0, y0 = op.get("x"), op.get("y")
            cw = op.get("width") or (w - (x0 or 0))
            ch = op.get("height") or (h - (y0 or 0))
            x = (w - cw) // 2 if x0 is None else x0
            y = (h - ch) // 2 if y0 is None else y0
            if cw < 1 or ch < 1 or x < 0 or y < 0 or x + cw > w or y + ch > h:
                raise RequestError(f"the crop {cw}x{ch} at ({x}, {y}) does not fit inside the {w}x{h} image")
        else:
            raise RequestError("crop needs an aspect (like 1:1 or 16:9) or a width and height")
        planes = [p[y:y + ch, x:x + cw] for p in planes]
        applied = {"x": x, "y": y, "width": cw, "height": ch}
        if op.get("aspect"):
            applied["aspect"] = op["aspect"]
    elif name == "rotate":
        amount = _amount(op)
        turn = amount % 360
        if abs(turn - round(turn)) < 1e-9 and round(turn) % 90 == 0:
            code = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}
            planes = [cv2.rotate(p, code[round(turn) % 360]) if round(turn) % 360 else p for p in planes]
        else:
            m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), turn, 1.0)
            c, s = abs(m[0, 0]), abs(m[0, 1])
            nw, nh = int(np.ceil(w * c + h * s - 1e-6)), int(np.ceil(w * s + h * c - 1e-6))
            if max(nw, nh) > ops.MAX_SIDE:
                raise RequestError(f"rotating would make the image larger than {ops.MAX_SIDE} pixels")
            m[0, 2] += (nw - 1) / 2 - (w - 1) / 2
            m[1, 2] += (nh - 1) / 2 - (h - 1) / 2
            if alpha is None:  # the new corners are transparent
                planes.append(np.full((h, w), 255, np.uint8))
            planes = [cv2.warpAffine(p, m, (nw, nh), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                                     borderValue=0) for p in planes]
        applied = {"amount": amount}
    elif name == "flip":
        direction = op.get("direction") or "horizontal"
        planes = [cv2.flip(p, 1 if direction == "horizontal" else 0) for p in planes]
        applied = {"direction": direction}
    else:  # resize
        rw, rh, pct = op.get("width"), op.get("height"), op.get("amount")
        if rw and not rh:
            rh = max(1, round(h * rw / w))
        elif rh and not rw:
            rw = max(1, round(w * rh / h))
        elif not rw and not rh:
            if pct is None or pct <= 0:
                raise RequestError("resize needs a width, a height, or a percentage (amount, e.g. 50 for half)")
            rw, rh = max(1, round(w * pct / 100)), max(1, round(h * pct / 100))
        if max(rw, rh) > ops.MAX_SIDE:
            raise RequestError(f"the resized image would be {rw}x{rh}; the limit is {ops.MAX_SIDE} on a side")
        interp = cv2.INTER_AREA if rw * rh < w * h else cv2.INTER_CUBIC
        planes = [cv2.resize(p, (rw, rh), interpolation=interp) for p in planes]
        applied = {"width": rw, "height": rh}
    rgb = np.ascontiguousarray(planes[0])
    alpha = np.ascontiguousarray(planes[1]) if len(planes) > 1 else None
    return rgb, alpha, applied


def apply_op(op: dict, rgb, alpha):
    """One operation -> (rgb, alpha, the op as applied, defaults filled in)."""
    name = op["op"]
    if name in ("crop", "rotate", "flip", "resize"):
        rgb, alpha, applied = _geometry(name, op, rgb, alpha)
        return rgb, alpha, {"op": name, **applied}
    applied = {"op": name}
    h, w = rgb.shape[:2]
    scale = max(min(h, w), 100) / 300.0  # blur radii grow with the image
    if name in ("brightness", "contrast", "saturation"):
        applied["amount"] = amount = _amount(op, -100, 100)
        rgb = {"brightness": ops.brightness, "contrast": ops.contrast, "saturation": ops.saturation}[name](
            rgb, amount)
    elif name == "hue":
        applied["amount"] = amount = _amount(op)
        rgb = ops.hue_shift(rgb, amount)
    elif name == "blur":
        applied["amount"] = amount = min(abs(_amount(op)), 20)
        rgb = ops.gaussian(rgb, amount * scale)
    elif name == "sharpen":
        applied["amount"] = amount = min(abs(_amount(op)), 5)
        rgb = ops.sharpen(rgb, amount, max(1.0, scale))
    elif name == "grayscale":
        rgb = ops.grayscale(rgb)
    elif name == "invert":
        rgb = 255 - rgb
    elif name == "text":
        position = op.get("position") or "bottom"
        new = ops.draw_text(rgb, op.get("text"), position)
        if alpha is not None:
            alpha = np.where((new != rgb).any(axis=2), 255, alpha).astype(np.uint8)
        rgb = new
        applied.update(text=op.get("text"), position=position)
    elif name in ("background_blur", "background_remove"):
        mask = ops.subject_mask(rgb)
        if name == "background_remove":
            a = np.rint(mask * 255).astype(np.uint8)
            alpha = a if alpha is None else np.minimum(alpha, a)
        else:
            applied["amount"] = amount = min(abs(_amount(op)), 20)
            rgb = ops.blur_background(rgb, mask, amount * scale)
    elif name == "recolor":
        target = op.get("target") or "all"
        color = ops.parse_color(op.get("color"))
        if target == "all":
            rgb = ops.tint(rgb, color)
        else:
            if target == "sky":
                mask = ops.sky_mask(rgb)
            else:
                mask = ops.subject_mask(rgb)
                mask = mask if target == "foreground" else 1.0 - mask
            rgb = ops.recolor_region(rgb, mask, color)
        applied.update(target=target, color=op.get("color"))
    else:
        raise RequestError(f"unknown operation {name!r}")
    return np.ascontiguousarray(rgb), alpha, applied


# --- the instruction parser -------------------------------------------------------

_COLOR_FORMS = {"reddish": "red", "redder": "red", "bluer": "blue", "bluish": "blue", "blueish": "blue",
                "greener": "green", "greenish": "green", "yellower": "yellow", "yellowish": "yellow",
                "pinker": "pink", "pinkish": "pink", "purpler": "purple", "purplish": "purple",
                "browner": "brown", "brownish": "brown", "orangey": "orange", "orangish": "orange",
                "golden": "gold", "warmer": "orange", "cooler": "blue", "colder": "blue"}
_COLOR_RE = re.compile(r"#[0-9a-f]{6}\b|#[0-9a-f]{3}\b|\b(?:%s)\b" % "|".join(
    sorted(list(ops.COLORS) + list(_COLOR_FORMS), key=len, reverse=True)))
_QUOTE_RE = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d|\u2018([^\u2019]*)\u2019|(?<!\w)\'(.*?)\'(?!\w)')
_SPLIT_RE = re.compile(r"\s*(?:[,;]|\.(?:\s+|$)|\band then\b|\bthen\b|\band\b|\balso\b|\bplus\b)\s*", re.I)
_LITTLE = r"\b(?:slightly|a bit|a little|a touch|somewhat|bit)\b"
_LOT = r"\b(?:much|a lot|lots|very|way|really|far|significantly|heavily|strongly|extremely)\b"
_LESS = r"\b(?:less|lower|reduce|decrease|down|fewer|tone down)\b"


def _num(x: str):
    v = float(x)
    return int(v) if v.is_integer() else v


def _strength(c: str, default, little, lot):
    return little if re.search(_LITTLE, c) else lot if re.search(_LOT, c) else default


def _percent(c: str, sign: int) -> dict:
    m = re.search(r"(\d+(?:\.\d+)?)\s*(?:%|percent)?", c)
    amount = _num(m.group(1)) if m else _strength(c, 30, 15, 60)
    return {"amount": sign * min(abs(amount), 100)}


def _color_of(c: str):
    m = _COLOR_RE.search(c)
    if not m:
        return None
    word = m.group(0)
    return _COLOR_FORMS.get(word, "gray" if word == "grey" else word)


def _text_op(clause: str, low: str, quotes: list):
    keyword = re.search(r"\b(?:caption|captions|title|subtitle|headline|heading|label|write|writing|text|"
                        r"words|saying|says)\b", low)
    ref = re.search(r"\x00(\d+)\x00", clause)
    if not keyword and not ref:
        return None
    if ref:
        text = quotes[int(ref.group(1))]
    else:
        if re.search(r"\b(?:remove|delete|erase)\b", low) or not re.search(
                r"\b(?:caption|title|subtitle|headline|heading|label|write|add|put)\b", low):
            return None
        m = re.search(r"\b(?:caption|title|subtitle|headline|heading|label|write|text|words)\b[\s:]*"
                      r"(?:(?:that\s+)?(?:says|saying|reads|reading|of)\b\s*)?(.*)$", clause, re.I)
        text = re.sub(r"\s*\b(?:at|on|in|to|across|along)\s+(?:the\s+)?(?:very\s+)?"
                      r"(?:top|bottom|middle|center|centre)\b.*$", "", m.group(1), flags=re.I).strip()
    position = ("top" if re.search(r"\b(?:top|above|header)\b", low)
                else "center" if re.search(r"\b(?:center|centre|middle)\b", low)
                else "bottom" if re.search(r"\b(?:bottom|below|footer)\b", low)
                else "top" if re.search(r"\b(?:title|headline|heading)\b", low) else "bottom")
    return {"op": "text", "text": text, "position": position}


def _clause_op(clause: str, quotes: list):
    low = clause.lower()
    text = _text_op(clause, low, quotes)
    if text:
        return text
    low = re.sub(r"\x00\d+\x00", " ", low)
    color = _color_of(low)
    if re.search(r"\b(?:background|backdrop|bg)\b", low) or re.search(r"\bcut (?:it|him|her|them)? ?out\b", low):
        if re.search(r"\b(?:remove|delete|erase|drop|transparent|get rid|cut|without|no)\b", low):
            return {"op": "background_remove"}
        if re.search(r"\b(?:blur|blurry|blurred|bokeh|soften|defocus|out of focus|fuzzy)\b", low):
            return {"op": "background_blur"}
        if color:
            return {"op": "recolor", "target": "background", "color": color}
        return None
    if re.search(r"\bsky\b", low) and color:
        return {"op": "recolor", "target": "sky", "color": color}
    if re.search(r"\b(?:foreground|subject|person|object)\b", low) and color:
        return {"op": "recolor", "target": "foreground", "color": color}
    if re.search(r"\b(?:gr[ae]y\s*scale|monochrome|black-and-white|bw)\b", low):
        return {"op": "grayscale"}
    if re.search(r"\b(?:invert|inverted|inverse|negative)\b", low):
        return {"op": "invert"}
    if re.search(r"\bhue\b", low):
        m = re.search(r"-?\d+(?:\.\d+)?", low)
        return {"op": "hue", "amount": _num(m.group(0)) if m else 30}
    if re.search(r"\b(?:crop|square|aspect|ratio|widescreen)\b", low):
        m = re.search(r"(\d+(?:\.\d+)?)\s*[:/]\s*(\d+(?:\.\d+)?)", low)
        if m:
            return {"op": "crop", "aspect": f"{m.group(1)}:{m.group(2)}"}
        if re.search(r"\bsquare\b", low):
            return {"op": "crop", "aspect": "1:1"}
        if re.search(r"\bwidescreen\b", low):
            return {"op": "crop", "aspect": "16:9"}
        m = re.search(r"(\d+)\s*(?:x|\u00d7|by|\*)\s*(\d+)", low)
        if m:
            return {"op": "crop", "width": int(m.group(1)), "height": int(m.group(2))}
    if re.search(r"\b(?:flip|flipped|mirror|mirrored|reflect)\b", low):
        vertical = re.search(r"\b(?:vertical|vertically|upside|top to bottom|up-down)\b", low)
        return {"op": "flip", "direction": "vertical" if vertical else "horizontal"}
    rotate = re.search(r"\b(?:rotate|rotated|rotation|spin|tilt)\b", low)
    turn = re.search(r"\b(?:turn|twist)\b", low) and re.search(
        r"\d|\b(?:left|right|clockwise|counter-?clockwise|anti-?clockwise|sideways|upside)\b", low)
    if rotate or turn or re.search(r"\bupside down\b", low):
        m = re.search(r"-?\d+(?:\.\d+)?", low)
        amount = abs(_num(m.group(0))) if m else 180 if re.search(r"\bupside\b", low) else 90
        ccw = re.search(r"\b(?:counter-?clockwise|anti-?clockwise|ccw|left)\b", low)
        cw = not ccw and re.search(r"\b(?:clockwise|cw|right)\b", low)
        if m and float(m.group(0)) < 0:
            amount = -amount
        return {"op": "rotate", "amount": -amount if cw else amount}
    if re.search(r"\b(?:resize|resized|scale|rescale|size|smaller|bigger|larger|shrink|enlarge|upscale|"
                 r"downscale|wide|tall|pixels|px|halve|double)\b", low):
        m = re.search(r"(\d+)\s*(?:x|\u00d7|by|\*)\s*(\d+)", low)
        if m:
            return {"op": "resize", "width": int(m.group(1)), "height": int(m.group(2))}
        m = re.search(r"(\d+)\s*(?:px|pixels)?\s*(wide|width|across|tall|high|height)\b", low) or re.search(
            r"\b(width|height)\s*(?:of|to|=|:)?\s*(\d+)", low)
        if m:
            n, dim = (m.group(1), m.group(2)) if m.group(1).isdigit() else (m.group(2), m.group(1))
            return {"op": "resize", ("width" if dim in ("wide", "width", "across") else "height"): int(n)}
        m = re.search(r"(\d+(?:\.\d+)?)\s*(?:%|percent)", low)
        for pattern, pct in ((r"\b(?:half|halve)\b", 50), (r"\bquarter\b", 25), (r"\bthird\b", 33.33),
                             (r"\b(?:double|twice)\b", 200), (r"\b(?:triple|three times)\b", 300),
                             (r"\b(?:smaller|shrink|downscale)\b", 50),
                             (r"\b(?:bigger|larger|enlarge|upscale)\b", 200)):
            if m or re.search(pattern, low):
                return {"op": "resize", "amount": _num(m.group(1)) if m else pct}
        m = re.search(r"\b(\d+)\b", low)
        if m:
            return {"op": "resize", "width": int(m.group(1))}
    if re.search(r"\b(?:brighter|brighten|lighter|lighten|brightness|darker|darken|dim|dimmer|exposure)\b", low):
        dark = re.search(r"\b(?:darker|darken|dim|dimmer)\b", low) or re.search(_LESS, low)
        return {"op": "brightness", **_percent(low, -1 if dark else 1)}
    if re.search(r"\b(?:contrast|punchier|punchy|flatter)\b", low):
        less = re.search(r"\b(?:flatter|softer)\b", low) or re.search(_LESS, low)
        return {"op": "contrast", **_percent(low, -1 if less else 1)}
    if re.search(r"\b(?:saturat\w*|desaturat\w*|colou?rful|vivid|vibrant|muted|washed out|dull|intense)\b", low):
        less = re.search(r"\b(?:desaturat\w*|muted|washed out|dull)\b", low) or re.search(_LESS, low)
        return {"op": "saturation", **_percent(low, -1 if less else 1)}
    if re.search(r"\b(?:blur|blurry|blurred|blurrier|soften|out of focus|defocus|fuzzy|unfocus)\w*", low):
        m = re.search(r"\d+(?:\.\d+)?", low)
        return {"op": "blur", "amount": _num(m.group(0)) if m else _strength(low, 3, 1.5, 8)}
    if re.search(r"\b(?:sharpen|sharper|sharpened|crisper|crisp|clearer|deblur|unblur)\b", low):
        m = re.search(r"\d+(?:\.\d+)?", low)
        return {"op": "sharpen", "amount": _num(m.group(0)) if m else _strength(low, 1, 0.5, 2)}
    if color and (re.search(r"\b(?:%s)\b" % "|".join(_COLOR_FORMS), low)
                  or re.search(r"\b(?:more|tint|tinted|cast|tone|toned|wash)\b", low)
                  or re.search(r"\b(?:make|turn|paint|colou?r)\s+(?:it|this|that|everything|the (?:whole )?"
                               r"(?:image|picture|photo|thing))\b", low)):
        return {"op": "grayscale"} if color == "gray" else {"op": "recolor", "target": "all", "color": color}
    return None


def parse_instruction(text: str) -> list[dict]:
    """English edit request -> operations, in order; [] when nothing is understood."""
    quotes: list[str] = []

    def stash(m):
        quotes.append(next(g for g in m.groups() if g is not None))
        return f" \x00{len(quotes) - 1}\x00 "

    s = _QUOTE_RE.sub(stash, str(text or ""))
    s = re.sub(r"\bcolour", "color", s, flags=re.I)
    s = re.sub(r"\bblack\s*(?:and|&|n)\s*white\b|\bb\s*[&/]\s*w\b", "grayscale", s, flags=re.I)
    s = re.sub(r"\bgr[ae]y\s*scale\b", "grayscale", s, flags=re.I)
    out = []
    for clause in _SPLIT_RE.split(s):
        if clause and clause.strip():
            op = _clause_op(clause.strip(), quotes)
            if op:
                out.append(op)
    return out


# --- the backend -------------------------------------------------------------------

@register("edit_image", "opencv")
class OpenCVImageEditor(Backend):
    task = "edit_image"
    name = "opencv"

    def __init__(self, **config) -> None:
        self.config = config

    def can_do(self, request: dict, inputs) -> bool:
        """Exact edits it understands (operations given, or read from the words)."""
        return bool(request.get("operations") or parse_instruction(request.get("instruction", "")))

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress, cancel) -> Result:
        inputs = list(inputs or [])
        if len(inputs) != 1:
            raise RequestError(f"editing needs exactly one image to work on; got {len(inputs)}")
        steps = list(request.get("operations") or [])
        if not steps:
            steps = parse_instruction(request.get("instruction", ""))
            if not steps:
                raise RequestError(f"I couldn't tell which edit you want from "
                                   f"{request.get('instruction', '')!r}. I can: {CAN_DO}.")
        steps = [validate(IMAGE_OP, dict(s), f"operations[{i}]") for i, s in enumerate(steps)]
        check(cancel)
        rgb, alpha = ops.load_image(Path(inputs[0]))
        applied = []
        for i, step in enumerate(steps):
            check(cancel)
            try:
                rgb, alpha, done = apply_op(step, rgb, alpha)
            except (cv2.error, MemoryError, ValueError) as exc:
                raise GenerationError(f"the {step['op']} edit failed: {exc}") from exc
            applied.append(done)
            progress(step["op"], (i + 1) / len(steps))
        check(cancel)
        data = ops.encode_png(rgb, alpha)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"edited-{hashlib.sha1(data).hexdigest()[:10]}.png"
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        h, w = rgb.shape[:2]
        return Result("image", str(path), meta={"width": w, "height": h, "backend": self.name,
                                                  "operations": applied})
