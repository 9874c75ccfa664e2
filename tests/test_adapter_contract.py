"""One adapter contract over both image adapters: the cpu profile's tools
(ImagePerception) and the gpu profile's vision-language model
(VisionLanguageAdapter, here a seeded tiny random Qwen2.5-VL built in code),
then what only the neural adapter does: vision tokens, video, loading real
checkpoints from a directory (Qwen2.5-VL and Qwen2.5-Omni's thinker), errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.perception.base import Perception
from engine.perception.image_tools import ImagePerception
from engine.llm.vlm_inputs import SETTING
from engine.perception.neural import VisionLanguageAdapter
from engine.llm.tiny_omni import build_tiny_vlm
from engine.errors import InputError, Unavailable
from engine.session import Session
from generators.base import Cancelled

NAME = "holiday photo.png"  # the name the user knows (with a space, as names are)


class Cancel:
    """cancelled turns True after `after` looks (0: from the start)."""

    def __init__(self, after: int = 0) -> None:
        self.after, self.looks = after, 0

    @property
    def cancelled(self) -> bool:
        self.looks += 1
        return self.looks > self.after


def make_image(path, color=(200, 30, 30), box=False):
    im = Image.new("RGB", (96, 64), color)
    if box:
        draw = ImageDraw.Draw(im)
        draw.rectangle([12, 10, 60, 40], fill=(255, 255, 255))
        draw.text((16, 18), "OPEN", fill=(0, 0, 0))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {"image": make_image(root / NAME, box=True), "red": make_image(root / "red.png"),
            "green": make_image(root / "green.png", color=(20, 180, 60), box=True), "root": root}


ADAPTERS = {
    "tools": lambda: ImagePerception(),
    "neural": lambda: VisionLanguageAdapter("tiny", max_new_tokens=16),
}


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def adapter(request):
    return request.param, ADAPTERS[request.param]()


@pytest.fixture(scope="module")
def neural():
    return VisionLanguageAdapter("tiny", max_new_tokens=16)


# ---- the shared contract -------------------------------------------------------------------------
def test_returns_grounded_perception(adapter, media, tmp_path):
    which, seer = adapter
    p = seer.perceive(media["image"], tmp_path)
    assert isinstance(p, Perception)
    assert p.kind == "image" and p.name == NAME
    assert p.facts.strip() and NAME in p.facts
    assert isinstance(p.data, dict) and p.data
    assert p.timings_ms.get("total", 0) > 0
    if which == "neural":
        assert p.data["tokens"] > 0 and p.data["description"] and p.data["arch"] == "qwen2_5_vl"
        assert p.facts.startswith(f"Image {NAME}: ")


def test_corrupt_or_missing_image_is_an_input_error(adapter, tmp_path):
    _, seer = adapter
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(InputError, match="broken.png"):
        seer.perceive(broken, tmp_path)
    with pytest.raises(InputError):
        seer.perceive(tmp_path / "nope.jpg", tmp_path)


def test_cancel_raises_interrupted(adapter, media, tmp_path):
    _, seer = adapter
    with pytest.raises(Cancelled):
        seer.perceive(media["image"], tmp_path, Cancel())


def test_same_image_same_facts(adapter, media, tmp_path):
    which, seer = adapter
    first = seer.perceive(media["image"], tmp_path).facts
    assert seer.perceive(media["image"], tmp_path).facts == first
    if which == "neural":  # a fresh instance builds the same seeded model
        assert ADAPTERS["neural"]().perceive(media["image"], tmp_path).facts == first


# ---- the neural adapter --------------------------------------------------------------------------
def test_the_model_sees_the_pixels(neural, media):
    import torch

    kind, red, info = neural.prepare(media["red"])
    _, green, _ = neural.prepare(media["green"])
    assert kind == "image" and info["vision_tokens"] > 0
    assert info["vision_tokens"] == int(red["image_grid_thw"].prod()) // 4  # 2x2 patches merge to one token
    assert torch.equal(red["input_ids"], green["input_ids"])  # same prompt, same size: only pixels differ
    assert not torch.equal(red["pixel_values"], green["pixel_values"])
    with torch.inference_mode():
        a = neural._model(**red).logits[0, -1]
        b = neural._model(**green).logits[0, -1]
    assert (a - b).abs().max() > 1e-3


def test_a_short_video_goes_through_the_video_path(neural, tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 4, (64, 48))
    for i in range(8):  # a green bar walking left to right
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, i * 8:(i + 1) * 8] = (0, 255, 0)
        writer.write(frame)
    writer.release()
    kind, inputs, info = neural.prepare(path)
    assert kind == "video" and info["frames"] == 8
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    assert int(inputs["video_grid_thw"][0, 0]) == 4  # 8 frames, 2 per temporal patch
    p = neural.perceive(path, tmp_path)
    assert p.kind == "video" and p.name == "clip.avi" and "clip.avi" in p.facts
    assert p.data["vision_tokens"] == info["vision_tokens"] > 0 and p.data["duration_s"] == 2.0
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(InputError, match="broken.mp4"):
        neural.perceive(broken, tmp_path)


def test_cancel_between_tokens_then_the_model_still_works(neural, media, tmp_path):
    with pytest.raises(Cancelled):
        neural.perceive(media["image"], tmp_path, Cancel(after=5))  # stops inside generate
    assert neural.perceive(media["image"], tmp_path).data["tokens"] > 0


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_5_omni"])
def test_loads_a_checkpoint_directory_by_model_type(arch, media, tmp_path):
    """The real load path: config.json -> architecture, weights, tokenizer and image processor from disk.
    Omni is saved the way Qwen2.5-Omni ships: a qwen2_5_omni config and thinker.* weights."""
    model, proc = build_tiny_vlm(0, arch)
    expected = VisionLanguageAdapter("tiny", device="cpu", model_obj=model, processor=proc, max_new_tokens=12) \
        .perceive(media["image"], tmp_path).facts
    where = tmp_path / arch
    if arch == "qwen2_5_vl":
        model.save_pretrained(where)
    else:
        from safetensors.torch import save_file
        from transformers import Qwen2_5OmniConfig

        Qwen2_5OmniConfig(thinker_config=model.config.to_dict(), enable_audio_output=False).save_pretrained(where)
        model.generation_config.save_pretrained(where)
        save_file({f"thinker.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  str(where / "model.safetensors"), metadata={"format": "pt"})
    proc.tokenizer.save_pretrained(where)
    proc.image_processor.save_pretrained(where)
    seer = VisionLanguageAdapter(str(where), device="cpu", max_new_tokens=12)
    p = seer.perceive(media["image"], tmp_path)
    assert type(seer._model).__name__ == type(model).__name__ and seer._model.dtype.is_floating_point
    assert p.facts == expected and "model_load" in p.timings_ms


def test_a_missing_model_says_what_to_set():
    seer = VisionLanguageAdapter("no/such-model", device="cpu")  # cheap: nothing loads yet
    with pytest.raises(Unavailable) as err:
        seer.prepare("any.png")
    assert "no/such-model" in err.value.why and SETTING in err.value.what_to_set


def test_4bit_without_cuda_is_refused_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Unavailable, match="CUDA") as err:
        VisionLanguageAdapter("tiny", quantization="4bit")
    assert "quantization=none" in err.value.what_to_set
    with pytest.raises(ValueError, match="8bit"):
        VisionLanguageAdapter("tiny", quantization="8bit")


@pytest.mark.gpu
def test_tiny_model_in_4bit_on_cuda(media, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    seer = VisionLanguageAdapter("tiny", quantization="4bit", max_new_tokens=8)
    p = seer.perceive(media["image"], tmp_path)
    assert seer._model.device.type == "cuda"
    assert any(type(m).__name__ == "Linear4bit" for m in seer._model.modules())
    assert p.kind == "image" and NAME in p.facts and p.data["tokens"] > 0 and p.data["vision_tokens"] > 0


def test_engine_neural_path_adds_the_model_description(tmp_path):
    """perception.backend=neural through the engine: the tools' facts plus the (tiny) VLM's
    answer from the image itself and the user's question; an unavailable model leaves the
    tools' facts and says why."""
    from PIL import Image

    from engine.config import load_config
    from engine.engine import Engine
    from engine.session import Turn

    img = tmp_path / "sign.png"
    Image.new("RGB", (96, 64), (30, 90, 200)).save(img)
    for model, expect in (("tiny", "Model description"), ("no/such-model", "No model description")):
        eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path / model.replace("/", "_")),
                                                    "perception.backend": "neural",
                                                    "perception.vl_model": model}, env={}))
        try:
            seen = [e for e in Session(eng).submit(Turn("what is this?", (str(img),))) if e.type == "perceived"]
            assert "96x64" in seen[0].facts and expect in seen[0].facts
            if model == "tiny":  # the model looked at the image with the user's own question
                assert seen[0].data["vlm"]["question"] == "what is this?" and seen[0].data["vlm"]["vision_tokens"] > 0
        finally:
            eng.close()
