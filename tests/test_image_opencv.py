"""The classical OpenCV image editor: exact geometry, tone, text, masks, the
instruction parser and the error/cancel paths. Images are made here with numpy."""
from __future__ import annotations

import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from generators import registry
from generators.base import Cancelled, RequestError, validate
from generators.image_opencv import OpenCVImageEditor, parse_instruction
from generators.tools import TOOLS

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(tmp_path, arr, name="in.png", mode=None):
    path = tmp_path / name
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(path)
    return path


def edit(tmp_path, path, operations=(), instruction="edit", cancel=None, progress=None):
    request = validate(TOOLS["edit_image"].schema, {"instruction": instruction, "operations": list(operations)})
    out = tmp_path / "out"
    res = OpenCVImageEditor().run(request, [path], out, progress or (lambda s, f: None),
                                  cancel or SimpleNamespace(cancelled=False))
    return res, np.asarray(Image.open(res.path))


def canvas(w, h, color=(90, 90, 90)):
    return np.full((h, w, 3), color, np.uint8)


def test_registered():
    entry = [e for e in registry.entries("edit_image") if e.name == "opencv"][0]
    assert entry.factory is OpenCVImageEditor and entry.available() == (True, "")


def test_square_crop_is_centred(tmp_path):
    img = canvas(300, 200)
    img[100, 150] = RED   # the centre
    img[10, 60] = BLUE    # inside the crop (x 50..249)
    img[5, 20] = RED      # cut away
    calls = []
    res, out = edit(tmp_path, save(tmp_path, img), [{"op": "crop", "aspect": "1:1"}],
                    progress=lambda s, f: calls.append((s, f)))
    assert out.shape == (200, 200, 3)
    assert tuple(out[100, 100]) == RED and tuple(out[10, 10]) == BLUE
    assert (out == RED).all(axis=2).sum() == 1
    assert res.kind == "image" and res.path.endswith(".png") and "edited-" in res.path
    assert res.meta == {"width": 200, "height": 200, "backend": "opencv",
                        "operations": [{"op": "crop", "x": 50, "y": 0, "width": 200, "height": 200, "aspect": "1:1"}]}
    assert calls == [("crop", 1.0)]


def test_crop_16_9_and_box(tmp_path):
    path = save(tmp_path, canvas(300, 300))
    assert edit(tmp_path, path, [{"op": "crop", "aspect": "16:9"}])[1].shape == (169, 300, 3)
    img = canvas(100, 80)
    img[30, 40] = RED
    _, out = edit(tmp_path, save(tmp_path, img), [{"op": "crop", "x": 40, "y": 30, "width": 20, "height": 10}])
    assert out.shape == (10, 20, 3) and tuple(out[0, 0]) == RED


def test_rotate_right_angles_and_free_angle(tmp_path):
    img = canvas(40, 30)
    img[0, 0] = RED  # top-left corner
    path = save(tmp_path, img)
    _, ccw = edit(tmp_path, path, [{"op": "rotate", "amount": 90}])   # positive = counter-clockwise
    assert ccw.shape == (40, 30, 3) and tuple(ccw[39, 0]) == RED      # -> bottom-left
    _, cw = edit(tmp_path, path, [{"op": "rotate", "amount": -90}])
    assert tuple(cw[0, 29]) == RED                                     # -> top-right
    _, half = edit(tmp_path, path, [{"op": "rotate", "amount": 180}])
    assert tuple(half[29, 39]) == RED
    res, free = edit(tmp_path, path, [{"op": "rotate", "amount": 45}])
    side = int(np.ceil((40 + 30) / np.sqrt(2) - 1e-6))
    assert free.shape == (side, side, 4) and free[0, 0, 3] == 0 and free[side // 2, side // 2, 3] == 255


def test_flip_and_resize(tmp_path):
    img = canvas(30, 20)
    img[0, 0] = RED
    path = save(tmp_path, img)
    _, out = edit(tmp_path, path, [{"op": "flip", "direction": "horizontal"}])
    assert tuple(out[0, 29]) == RED and tuple(out[0, 0]) != RED
    _, out = edit(tmp_path, path, [{"op": "flip", "direction": "vertical"}])
    assert tuple(out[19, 0]) == RED
    big = save(tmp_path, canvas(300, 200), "big.png")
    assert edit(tmp_path, big, [{"op": "resize", "width": 150}])[1].shape == (100, 150, 3)
    assert edit(tmp_path, big, [{"op": "resize", "height": 50}])[1].shape == (50, 75, 3)
    assert edit(tmp_path, big, [{"op": "resize", "amount": 50}])[1].shape == (100, 150, 3)
    assert edit(tmp_path, big, [{"op": "resize", "width": 64, "height": 64}])[1].shape == (64, 64, 3)


def test_tone_ops(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(40, 200, (32, 48, 3), dtype=np.uint8)
    path = save(tmp_path, img)
    _, gray = edit(tmp_path, path, [{"op": "grayscale"}])
    assert gray.shape == (32, 48, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (edit(tmp_path, path, [{"op": "invert"}])[1] == 255 - img).all()
    res, bright = edit(tmp_path, path, [{"op": "brightness"}])
    assert bright.mean() > img.mean() + 10 and res.meta["operations"] == [{"op": "brightness", "amount": 30}]
    assert edit(tmp_path, path, [{"op": "brightness", "amount": -50}])[1].mean() < img.mean() - 30
    assert edit(tmp_path, path, [{"op": "contrast", "amount": 50}])[1].std() > img.std() * 1.3
    sat = lambda a: cv2.cvtColor(a, cv2.COLOR_RGB2HSV)[..., 1].mean()  # noqa: E731
    assert sat(edit(tmp_path, path, [{"op": "saturation", "amount": -60}])[1]) < sat(img) * 0.6
    assert edit(tmp_path, path, [{"op": "blur"}])[1].std() < img.std() * 0.8
    assert edit(tmp_path, path, [{"op": "sharpen"}])[1].std() > img.std()
    _, hue = edit(tmp_path, save(tmp_path, canvas(8, 8, RED), "red.png"), [{"op": "hue", "amount": 120}])
    assert tuple(hue[4, 4]) == (0, 255, 0)


def test_text_only_in_the_top_band(tmp_path):
    img = canvas(320, 240)
    _, out = edit(tmp_path, save(tmp_path, img), [{"op": "text", "text": "Hello", "position": "top"}])
    rows = np.nonzero((out != img).any(axis=2).any(axis=1))[0]
    assert rows.size > 5 and rows.max() < 240 // 3
    assert (out > 230).all(axis=2).any() and (out < 40).all(axis=2).any()  # white letters, black outline


def test_background_remove_makes_corners_transparent(tmp_path):
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(60, 6, (120, 160, 3)), 0, 255).astype(np.uint8)
    cv2.circle(img, (80, 60), 30, (250, 230, 90), -1)
    _, out = edit(tmp_path, save(tmp_path, img), [{"op": "background_remove"}])
    assert out.shape == (120, 160, 4)
    assert all(out[y, x, 3] == 0 for y, x in ((0, 0), (0, 159), (119, 0), (119, 159), (60, 10)))
    assert out[60, 80, 3] == 255 and out[45, 80, 3] == 255
    _, blurred = edit(tmp_path, save(tmp_path, img), [{"op": "background_blur"}])
    assert blurred.shape == (120, 160, 3)
    assert blurred[:15].std() < img[:15].std() * 0.7  # the background is smoothed, the subject stays sharp
    assert np.abs(blurred[55:65, 75:85].astype(int) - img[55:65, 75:85]).max() < 3


def test_recolor_sky_and_tint(tmp_path):
    img = np.zeros((100, 80, 3), np.uint8)
    img[:50] = (70, 130, 220)   # blue sky
    img[50:] = (40, 160, 60)    # green field
    res, out = edit(tmp_path, save(tmp_path, img), [{"op": "recolor", "target": "sky", "color": "purple"}])
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
    assert abs(int(hsv[10, 40, 0]) * 2 - 282) < 15 and hsv[10, 40, 1] > 100  # purple (128,40,170) is 282 degrees
    assert (out[50:] == img[50:]).all()
    assert res.meta["operations"] == [{"op": "recolor", "target": "sky", "color": "purple"}]
    _, tinted = edit(tmp_path, save(tmp_path, canvas(10, 10, (100, 100, 100)), "g.png"),
                     [{"op": "recolor", "target": "all", "color": "#ff0000"}])
    assert tuple(tinted[5, 5]) == (139, 75, 75)


def test_input_modes_and_exif(tmp_path):
    img = canvas(40, 20, (10, 200, 30))
    rgba = np.dstack([img, np.full((20, 40), 128, np.uint8)])
    _, out = edit(tmp_path, save(tmp_path, rgba, "a.png"), [{"op": "invert"}])
    assert out.shape == (20, 40, 4) and out[0, 0, 3] == 128 and tuple(out[0, 0, :3]) == (245, 55, 225)
    assert edit(tmp_path, save(tmp_path, img, "p.png", mode="P"), [{"op": "flip"}])[1].shape == (20, 40, 3)
    assert edit(tmp_path, save(tmp_path, img, "l.png", mode="L"), [{"op": "flip"}])[1].shape == (20, 40, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "e.jpg"
    Image.fromarray(img).save(path, exif=exif)
    assert edit(tmp_path, path, [{"op": "invert"}])[1].shape == (40, 20, 3)


@pytest.mark.parametrize("text, ops", [
    ("crop it to a square", [{"op": "crop", "aspect": "1:1"}]),
    ("crop to 16:9", [{"op": "crop", "aspect": "16:9"}]),
    ("rotate 90 degrees", [{"op": "rotate", "amount": 90}]),
    ("rotate left", [{"op": "rotate", "amount": 90}]),
    ("rotate it 90 degrees clockwise", [{"op": "rotate", "amount": -90}]),
    ("flip horizontally", [{"op": "flip", "direction": "horizontal"}]),
    ("mirror it", [{"op": "flip", "direction": "horizontal"}]),
    ("resize to 256x256", [{"op": "resize", "width": 256, "height": 256}]),
    ("make it half the size", [{"op": "resize", "amount": 50}]),
    ("brighter", [{"op": "brightness", "amount": 30}]),
    ("make it a bit darker", [{"op": "brightness", "amount": -15}]),
    ("more contrast", [{"op": "contrast", "amount": 30}]),
    ("more saturated", [{"op": "saturation", "amount": 30}]),
    ("less colourful", [{"op": "saturation", "amount": -30}]),
    ("shift the hue by 30", [{"op": "hue", "amount": 30}]),
    ("blur it", [{"op": "blur", "amount": 3}]),
    ("sharpen", [{"op": "sharpen", "amount": 1}]),
    ("make it black and white", [{"op": "grayscale"}]),
    ("grayscale", [{"op": "grayscale"}]),
    ("invert the colours", [{"op": "invert"}]),
    ("add the caption 'Summer'", [{"op": "text", "text": "Summer", "position": "bottom"}]),
    ('write "Hello" at the top', [{"op": "text", "text": "Hello", "position": "top"}]),
    ("add the caption Summer at the top", [{"op": "text", "text": "Summer", "position": "top"}]),
    ("blur the background", [{"op": "background_blur"}]),
    ("remove the background", [{"op": "background_remove"}]),
    ("make the sky purple", [{"op": "recolor", "target": "sky", "color": "purple"}]),
    ("make it bluer", [{"op": "recolor", "target": "all", "color": "blue"}]),
    ("make it more red", [{"op": "recolor", "target": "all", "color": "red"}]),
    ("crop it to a square and add the caption 'Summer'",
     [{"op": "crop", "aspect": "1:1"}, {"op": "text", "text": "Summer", "position": "bottom"}]),
    ('brighter, then flip it and write "Salt and pepper, please"',
     [{"op": "brightness", "amount": 30}, {"op": "flip", "direction": "horizontal"},
      {"op": "text", "text": "Salt and pepper, please", "position": "bottom"}]),
    ("what a lovely day", []),
])
def test_parse_instruction(text, ops):
    assert parse_instruction(text) == ops
    for op in ops:
        validate(TOOLS["edit_image"].schema["properties"]["operations"]["items"], op)


def test_instruction_drives_the_edit(tmp_path):
    path = save(tmp_path, canvas(300, 200))
    res, out = edit(tmp_path, path, instruction="crop it to a square and add the caption 'Summer'")
    assert out.shape == (200, 200, 3) and [o["op"] for o in res.meta["operations"]] == ["crop", "text"]


def huge_png(path, w=12000, h=10000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("setup, operations, instruction, message", [
    ("corrupt", [{"op": "invert"}], "edit", "could not read the image"),
    ("huge", [{"op": "invert"}], "edit", "too large"),
    ("ok", [{"op": "crop", "x": 50, "y": 0, "width": 80, "height": 20}], "edit", "does not fit"),
    ("ok", [{"op": "recolor", "color": "octarine"}], "edit", "don't know the colour 'octarine'"),
    ("ok", [{"op": "text", "text": "  "}], "edit", "text to write is empty"),
    ("ok", [{"op": "brightness", "amount": 300}], "edit", "between -100 and 100"),
    ("ok", [], "what a lovely day", "couldn't tell which edit.*I can: crop"),
])
def test_errors(tmp_path, setup, operations, instruction, message):
    if setup == "corrupt":
        path = tmp_path / "bad.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    elif setup == "huge":
        path = huge_png(tmp_path / "huge.png")
    else:
        path = save(tmp_path, canvas(100, 60))
    with pytest.raises(RequestError, match=message):
        edit(tmp_path, path, operations, instruction)


def test_needs_exactly_one_input(tmp_path):
    request = validate(TOOLS["edit_image"].schema, {"instruction": "invert"})
    for inputs in ([], [tmp_path / "a.png", tmp_path / "b.png"]):
        with pytest.raises(RequestError, match="exactly one image"):
            OpenCVImageEditor().run(request, inputs, tmp_path, lambda s, f: None, SimpleNamespace(cancelled=False))


def test_cancel_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        edit(tmp_path, save(tmp_path, canvas(50, 50)), [{"op": "invert"}], cancel=SimpleNamespace(cancelled=True))
    assert not out.exists() or not any(out.iterdir())
