"""Every diffusion backend end to end on tiny random pipelines (no weights, no network).

One contract, run for each backend: the result file decodes with the asked
size/length, progress rises to 1.0, cancel after the first step leaves no
file, an out-of-memory error becomes a GenerationError that says so, and
without weights the backend is unavailable with a message naming what to set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from generators import registry
from generators.base import Cancelled, GenerationError, RequestError, validate
from generators.tools import TOOLS
from generators.tiny_diffusion import tiny_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning OpenMP threads on a busy
    2-core machine cost many times the work itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backend_class(task: str):
    from generators.audio_diffusion import AudioDiffusion
    from generators.edit_diffusion import EditDiffusion
    from generators.image_diffusion import ImageDiffusion
    from generators.shape_diffusion import ShapeDiffusion
    from generators.video_diffusion import VideoDiffusion

    return {"image": ImageDiffusion, "edit_image": EditDiffusion, "video": VideoDiffusion, "3d": ShapeDiffusion,
            "audio": AudioDiffusion}[task]


@dataclass
class Case:
    id: str
    task: str
    tool: str
    args: dict
    kind: str = ""  # tiny pipeline kind; the task when empty
    needs_image: bool = False
    denoiser: str = "unet"
    options: dict = field(default_factory=dict)

    def backend(self, **options):
        pipe = tiny_pipeline(self.kind or self.task)
        return backend_class(self.task)(model="", pipeline=pipe, steps=2, **{**self.options, **options})

    def request(self) -> dict:
        return validate(TOOLS[self.tool].schema, self.args)


CASES = [
    Case("image", "image", "generate_image", {"prompt": "a red cat", "width": 64, "height": 64, "steps": 2}),
    Case("edit", "edit_image", "edit_image", {"instruction": "make it blue"}, needs_image=True),
    Case("video", "video", "generate_video", {"prompt": "waves", "seconds": 0.5, "fps": 8, "width": 64,
                                              "height": 64}),
    Case("animatediff", "video", "generate_video", {"prompt": "waves", "seconds": 0.5, "fps": 6, "width": 80,
                                                    "height": 64}, kind="animatediff"),
    Case("3d", "3d", "generate_3d", {"prompt": "a cup"}, denoiser="prior"),
    Case("audio", "audio", "generate_audio", {"prompt": "rain on a roof", "seconds": 0.5}),
]


class Cancel:
    cancelled = False


def run(case: Case, backend, tmp_path, png, progress=None, cancel=None):
    events = []

    def record(stage, fraction):
        events.append((stage, fraction))
        if progress:
            progress(stage, fraction)

    inputs = [png] if case.needs_image else []
    out_dir = tmp_path / "out"
    return backend.run(case.request(), inputs, out_dir, record, cancel), events, out_dir


def check_file(case: Case, result) -> None:
    path = Path(result.path)
    assert path.is_file() and path.stat().st_size > 0
    if case.task in ("image", "edit_image"):
        from PIL import Image

        with Image.open(path) as im:
            assert im.format == "PNG"
            want = (case.args["width"], case.args["height"]) if case.task == "image" else (64, 48)
            assert im.size == want == (result.meta["width"], result.meta["height"])
    elif case.task == "video":
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            fps, size = float(stream.average_rate), (stream.width, stream.height)
            frames = sum(1 for _ in container.decode(stream))
        want = round(case.args["seconds"] * case.args["fps"])
        assert frames == want == result.meta["frames"]
        assert size == (case.args["width"], case.args["height"])
        assert fps == pytest.approx(case.args["fps"])
        assert result.meta["duration_s"] == pytest.approx(want / case.args["fps"])
    elif case.task == "3d":
        import trimesh

        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) > 0 and len(mesh.faces) == result.meta["faces"]
        assert result.kind == "model3d"
    elif case.task == "audio":
        import soundfile

        info = soundfile.info(str(path))
        assert info.samplerate == 16000 and info.format == "WAV"
        assert info.duration == pytest.approx(case.args["seconds"], rel=0.05)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_runs_end_to_end_with_progress(case, tmp_path, png):
    backend = case.backend()
    result, events, out_dir = run(case, backend, tmp_path, png)
    assert result.kind == {"image": "image", "edit_image": "image", "video": "video", "3d": "model3d",
                           "audio": "audio"}[case.task]
    assert result.meta["backend"].startswith(f"{backend.name}:")
    check_file(case, result)
    assert [p.name for p in out_dir.iterdir()] == [Path(result.path).name]  # nothing else left behind
    steps = [f for stage, f in events if stage == "denoising"]
    assert len(steps) >= 2 and steps[-1] == 1.0
    assert all(a < b for a, b in zip(steps, steps[1:])), steps
    assert all(0.0 <= f <= 1.0 for _, f in events)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cancel_after_first_step_leaves_no_file(case, tmp_path, png):
    cancel = Cancel()

    def stop(stage, fraction):
        if stage == "denoising":
            cancel.cancelled = True

    with pytest.raises(Cancelled):
        run(case, case.backend(), tmp_path, png, progress=stop, cancel=cancel)
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_out_of_memory_is_a_clear_error(case, tmp_path, png):
    backend = case.backend()
    pipe = backend.load()

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    getattr(pipe, case.denoiser).forward = oom
    with pytest.raises(GenerationError, match="ran out of memory.*try a smaller size") as caught:
        run(case, backend, tmp_path, png)
    assert not isinstance(caught.value, (Cancelled, RequestError))
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("task", ["image", "edit_image", "video", "3d", "audio"])
def test_unavailable_without_weights_says_what_to_set(task, tmp_path, monkeypatch):
    cls = backend_class(task)
    env = f"OMNI_GEN_{task.upper()}_MODEL"
    assert cls.env_var() == env
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(env, raising=False)
    ok, why = cls.available()
    assert not ok
    assert why.startswith(f"no weights: set --set generators.{cls.config_field}=<local dir or hub id>")
    assert env in why and cls.default_model in why
    entry = next(e for e in registry.entries(task) if e.factory is cls)
    assert entry.available() == (False, why)
    with pytest.raises(GenerationError, match="no weights"):
        cls().load()

    monkeypatch.setenv(env, str(tmp_path))  # a folder, but not a pipeline
    ok, why = cls.available()
    assert not ok and "model_index.json" in why and f"generators.{cls.config_field}=" in why

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert cls.available() == (True, "")
    assert cls.available(model="") == (False, f"no weights: {cls.what_to_set()}")
    assert cls.available(model="tiny") == (True, "")


def test_hub_id_counts_only_when_in_the_local_cache(tmp_path, monkeypatch):
    from generators.image_diffusion import ImageDiffusion

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert not ImageDiffusion.available("someone/tiny-sd")[0]
    repo = cache / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    assert ImageDiffusion.available("someone/tiny-sd") == (True, "")


def test_tiny_model_loads_unloads_and_reloads(tmp_path, png):
    case = CASES[0]
    backend = backend_class("image")(model="tiny", steps=2)
    assert backend._pipe is None  # nothing loads until the first run
    result, events, _ = run(case, backend, tmp_path, png)
    assert events[0] == ("loading", 0.0) and result.meta["backend"] == "diffusion:tiny"
    backend.unload()
    assert backend._pipe is None
    again, _, _ = run(case, backend, tmp_path, png)
    assert Path(again.path).read_bytes() == Path(result.path).read_bytes()  # same seed, same picture


def test_audio_for_a_video_is_muxed_into_it(tmp_path, mp4):
    import imageio_ffmpeg

    case = CASES[-1]
    backend = case.backend()
    result = backend.run(case.request(), [mp4], tmp_path / "out", lambda s, f: None, Cancel())
    assert result.kind == "video" and result.path.endswith(".mp4")
    assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".mp4"]  # the temporary WAV is gone
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(result.path)
    assert frames == 20 and seconds == pytest.approx(2.0, abs=0.1)
    probe = __import__("subprocess").run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", result.path],
                                         capture_output=True, text=True).stderr
    assert "Audio: aac" in probe and "Video:" in probe


@pytest.mark.parametrize("case_id, args, inputs, message", [
    ("edit", {"instruction": "make it blue"}, [], "needs an image"),
    ("edit", {"instruction": "crop it", "operations": [{"op": "crop", "aspect": "1:1"}]}, ["png"], "opencv"),
    ("edit", {"instruction": "make it blue"}, ["wav"], "cannot read voice.wav as an image"),
    ("video", {"prompt": "waves"}, ["png"], "from words only"),
    ("3d", {"prompt": "a table", "shapes": [{"shape": "box"}]}, [], "trimesh backend"),
    ("audio", {"prompt": "a tune", "notes": "C4 E4"}, [], "synth"),
    ("audio", {"prompt": "rain"}, ["png"], "add sound to a video only"),
])
def test_requests_it_cannot_do_are_refused(case_id, args, inputs, message, tmp_path, request):
    case = next(c for c in CASES if c.id == case_id)
    backend = backend_class(case.task)(model="", pipeline=object())  # never reached
    schema = TOOLS[case.tool].schema
    paths = [request.getfixturevalue(name) for name in inputs]
    request = validate(schema, args)
    with pytest.raises(RequestError, match=message):
        backend.run(request, paths, tmp_path / "out", lambda s, f: None, Cancel())
    assert not (tmp_path / "out").exists()
    assert backend.can_do(request, paths) == (message == "cannot read voice.wav as an image")  # found only on reading


def test_tiny_pipelines_are_seeded():
    a, b = tiny_pipeline("image", seed=3), tiny_pipeline("image", seed=3)
    assert all(np.array_equal(x.detach().numpy(), y.detach().numpy())
               for x, y in zip(a.unet.parameters(), b.unet.parameters()))
    with pytest.raises(ValueError, match="kinds are"):
        tiny_pipeline("smell")


def test_unload_lets_the_pipeline_go(tmp_path, png):
    """After a run, nothing of the backend keeps the pipeline alive: on a GPU its memory is what
    the LLM takes back (the CPU half of the gpu test below)."""
    import gc
    import weakref

    backend = CASES[0].backend()
    run(CASES[0], backend, tmp_path, png)
    gone = weakref.ref(backend._pipe)
    backend.unload()
    gc.collect()
    assert gone() is None


@pytest.mark.gpu
def test_fp16_on_cuda_and_unload_gives_the_memory_back(tmp_path, png):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    before = torch.cuda.memory_allocated()
    backend = backend_class("image")(model="tiny", steps=2)
    result, events, _ = run(CASES[0], backend, tmp_path, png)
    assert backend._pipe.unet.dtype == torch.float16 and backend._pipe.device.type == "cuda"
    check_file(CASES[0], result)
    assert torch.cuda.memory_allocated() > before
    backend.unload()
    assert torch.cuda.memory_allocated() <= before + 1024
