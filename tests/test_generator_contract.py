"""The one contract every generator backend keeps (generators/base.py), run on all
of them: the classical ones as they are, the diffusion ones on tiny random
pipelines. A new backend only has to add a row to CASES."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.media import ingest
from generators import registry
from generators.base import Cancelled, RequestError, validate
from generators.tools import TOOLS

registry.load_backends()
TASK_TOOL = {tool.task: name for name, tool in TOOLS.items()}


def _photo(tmp: Path) -> Path:
    img = np.zeros((96, 128, 3), np.uint8)
    img[:48] = (90, 150, 235)
    img[48:] = (40, 160, 40)
    img[30:70, 40:90] = (200, 60, 50)
    path = tmp / "photo.png"
    Image.fromarray(img).save(path)
    return path


def _clip(tmp: Path) -> Path:
    from generators.ffmpeg import ffmpeg_exe

    path = tmp / "clip.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
                    "-f", "lavfi", "-i", "sine=frequency=440", "-t", "2", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


# (task, backend, request, input maker, expected kind)
CASES = [
    ("edit_image", "opencv", {"instruction": "crop it to a square and make it brighter"}, _photo, "image"),
    ("edit_image", "instruct-pix2pix", {"instruction": "make it look like a painting"}, _photo, "image"),
    ("edit_video", "ffmpeg", {"operation": "trim", "start_s": 0.5, "end_s": 1.5}, _clip, "video"),
    ("3d", "trimesh", {"prompt": "a snowman next to a red cube"}, None, "model3d"),
    ("3d", "shap-e", {"prompt": "a chair"}, None, "model3d"),
    ("audio", "synth", {"prompt": "rain", "seconds": 1.5}, None, "audio"),
    ("audio", "audioldm", {"prompt": "birds singing", "seconds": 1.0}, None, "audio"),
    ("image", "diffusion", {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}, None, "image"),
    ("video", "diffusion", {"prompt": "waves", "seconds": 1, "fps": 4, "width": 64, "height": 64}, None, "video"),
]
IDS = [f"{c[0]}:{c[1]}" for c in CASES]


class Flag:
    def __init__(self) -> None:
        self.cancelled = False


def _backend(task, name):
    entry = next(e for e in registry.entries(task) if e.name == name)
    return entry.factory(**({"model": "tiny", "steps": 2} if "diffusion" in entry.factory.__module__ else {}))


@pytest.fixture(scope="module")
def backends():
    return {}


def _prepare(case, tmp, backends):
    task, name, request, make_input, kind = case
    key = (task, name)
    if key not in backends:
        backends[key] = _backend(task, name)
    request = validate(TOOLS[TASK_TOOL[task]].schema, dict(request))
    inputs = [make_input(tmp)] if make_input else []
    if make_input is _photo:
        request["image"] = "photo.png"
    if make_input is _clip:
        request["video"] = "clip.mp4"
    return backends[key], request, inputs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_result_is_valid_with_progress(case, tmp_path, backends):
    backend, request, inputs = _prepare(case, tmp_path, backends)
    assert backend.task == case[0] and backend.name == case[1]
    out, seen = tmp_path / "out", []
    out.mkdir()
    result = backend.run(request, inputs, out, lambda stage, f: seen.append((stage, f)), Flag())
    assert result.kind == case[4] and Path(result.path).parent == out
    record = ingest(result.path, tmp_path / "media", 1 << 30)  # the engine's own validation decodes it
    assert record.kind == case[4]
    assert seen and all(0.0 <= f <= 1.0 for _, f in seen) and all(isinstance(s, str) and s for s, _ in seen)
    assert seen[-1][1] == pytest.approx(1.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cancel_mid_run_leaves_nothing(case, tmp_path, backends):
    backend, request, inputs = _prepare(case, tmp_path, backends)
    out, flag = tmp_path / "out", Flag()
    out.mkdir()

    def progress(stage, fraction):
        flag.cancelled = True  # Stop pressed as soon as work began

    with pytest.raises(Cancelled):
        backend.run(request, inputs, out, progress, flag)
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_request_validation_names_the_field(tool):
    schema = TOOLS[tool].schema
    with pytest.raises(RequestError, match="required"):
        validate(schema, {})
    with pytest.raises(RequestError, match="unknown field"):
        validate(schema, {**{k: "x" for k in schema["required"]}, "bogus": 1})
    numeric = next((k for k, v in schema["properties"].items() if v.get("type") in ("number", "integer")), None)
    if numeric:
        base = {k: "a request" for k in schema["required"] if schema["properties"][k].get("type") == "string"}
        if "operation" in base:
            base["operation"] = "trim"
        with pytest.raises(RequestError, match=numeric):
            validate(schema, {**base, numeric: -10_000})


def test_every_registered_backend_is_covered():
    assert {(e.task, e.name) for e in registry.entries()} == {(c[0], c[1]) for c in CASES}
