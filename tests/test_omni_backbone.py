"""The omni backbone (engine/llm/omni.py): the LLM looks at images and video itself,
through its own processor; MoE router statistics split by modality; bitsandbytes 4-bit
layers with NF4 experts offloaded; the talker speaks; the GPU is handed to diffusion.

Tiny seeded random models of the real architectures (Qwen2.5-Omni's thinker, Qwen2.5-VL,
Qwen3-Omni-MoE's thinker), built in code, through the same code paths as real ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import LLMConfig, load_config
from engine.engine import Engine
from engine.errors import Unavailable
from engine.events import RouterStats, TextDelta
from engine.llm import load_backend
from engine.llm.base import GenParams
from engine.session import Session, Turn

pytestmark = pytest.mark.filterwarnings("ignore")
GREEDY = GenParams(max_new_tokens=10, temperature=0.0)
Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is in this picture?"}]


class Rec:  # what the engine passes: a stored MediaRecord's kind, path and name
    def __init__(self, kind, path, name=None):
        self.kind, self.path, self.name = kind, str(path), name or path.name


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    rng = np.random.RandomState(0)
    paths = []
    for i in range(2):
        p = d / f"pic{i}.png"
        Image.fromarray((rng.rand(64, 80, 3) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import cv2

    p = tmp_path_factory.mktemp("clip") / "clip.mp4"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), 8, (64, 48))
    for i in range(16):
        w.write(np.full((48, 64, 3), i * 15, np.uint8))
    w.release()
    return p


def run(backend, media=(), messages=Q, params=GREEDY):
    gen = backend.generate(messages, media, params)
    text, stats = [], None
    while True:
        try:
            e = next(gen)
        except StopIteration as stop:
            return "".join(text), stop.value, stats
        if isinstance(e, TextDelta):
            text.append(e.text)
        elif isinstance(e, RouterStats):
            stats = e.experts


def backend(model, tmp_path, **kw):
    return load_backend(LLMConfig(model=model, temperature=0.0, context_tokens=1024, **kw), tmp_path)


@pytest.mark.parametrize("model", ["tiny-omni", "tiny-vl", "tiny-omni-moe"])
def test_the_answer_comes_from_the_pixels_exactly_as_transformers_generate(model, pictures, tmp_path):
    """Our token loop over the processor's inputs gives transformers' own greedy answer, and
    another picture gives another answer (the model sees pixels, not a file name)."""
    b = backend(model, tmp_path)
    text, usage, _ = run(b, [Rec("image", pictures[0])])
    assert usage["media_tokens"]["image"] > 0 and usage["media_seen"] == ["pic0.png"]
    inputs, _, _ = b.omni.build(Q, [Rec("image", pictures[0])])
    with torch.inference_mode():
        ref = b.model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert text == b.tokenizer.decode(ref, skip_special_tokens=True) and text
    other, _, _ = run(b, [Rec("image", pictures[1])])
    assert other != text
    assert run(b, [Rec("image", pictures[0])])[0] == text  # and the same picture, the same answer


def test_a_video_goes_in_as_frames_and_wins_over_images(pictures, clip, tmp_path):
    b = backend("tiny-omni", tmp_path)
    text, usage, _ = run(b, [Rec("image", pictures[0]), Rec("video", clip)])
    assert set(usage["media_tokens"]) == {"video"} and usage["media_tokens"]["video"] > 0
    assert usage["media_seen"] == ["clip.mp4"] and text


def test_after_a_picture_a_text_turn_reuses_the_cache_with_the_right_positions(pictures, tmp_path):
    """Qwen's multimodal rotary offsets of the picture turn must not leak into the next
    turn: the reused-cache answer equals a fresh model's."""
    b = backend("tiny-omni", tmp_path)
    first, _, _ = run(b, [Rec("image", pictures[0])])
    follow = Q + [{"role": "assistant", "content": first}, {"role": "user", "content": "And the colours?"}]
    run(b, messages=follow)  # primes the text-only cache
    again = follow + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "More?"}]
    reused, usage, _ = run(b, messages=again)
    assert usage["cached_prompt_tokens"] > 0
    fresh, usage, _ = run(backend("tiny-omni", tmp_path), messages=again)
    assert usage["cached_prompt_tokens"] == 0 and reused == fresh


def test_moe_router_stats_are_split_by_modality(pictures, tmp_path):
    b = backend("tiny-omni-moe", tmp_path)
    _, usage, stats = run(b, [Rec("image", pictures[0])])
    image = usage["media_tokens"]["image"]
    decode = usage["completion_tokens"] - 1  # the last token is never run
    for layer in stats["layers"].values():
        assert layer["image"]["tokens"] == image
        assert layer["text"]["tokens"] == usage["prompt_tokens"] - image + decode
        for mod in ("image", "text"):
            assert sum(layer[mod]["counts"]) == layer[mod]["tokens"] * stats["top_k"]


def test_4bit_layers_with_nf4_experts_offloaded_answer_like_4bit_on_device(pictures, tmp_path):
    """--quantization 4bit on an MoE omni model: bitsandbytes 4-bit attention, our NF4 experts
    (bitsandbytes leaves fused expert tensors alone); offloading those within --vram-gb
    changes nothing in the answer, and the cache stays inside its budget."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    on_device = backend("tiny-omni-moe", tmp_path, quantization="4bit")
    assert isinstance(on_device.model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    from engine.moe.runtime import GiB, HEADROOM, _param_bytes

    layers = on_device.moe.layers
    experts = sum(la.expert_bytes(e) for la in layers for e in range(la.num_experts))
    shared = _param_bytes(on_device.model) - experts
    vram_gb = (shared + experts // 3) / (1 - HEADROOM) / GiB  # a third of the NF4 experts fit
    offloaded = backend("tiny-omni-moe", tmp_path, quantization="4bit", vram_gb=vram_gb)
    a, _, sa = run(on_device, [Rec("image", pictures[0])])
    b, _, sb = run(offloaded, [Rec("image", pictures[0])])
    assert a == b and a
    assert sa["expert_format"].startswith("nf4") and sa["cache"] is None
    cache = sb["cache"]
    assert cache["peak_bytes"] <= cache["budget_bytes"] and cache["evictions"] > 0
    assert sa["layers"] == sb["layers"]  # the same experts fired


def test_4bit_logits_stay_close_to_full_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    full, quant = backend("tiny", tmp_path), backend("tiny", tmp_path, quantization="4bit")
    ids = torch.tensor([full.encode(Q)])
    with torch.inference_mode():
        a, b = full.model(input_ids=ids).logits[0, -1], quant.model(input_ids=ids).logits[0, -1]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cos > 0.9 and quant.model.get_memory_footprint() < full.model.get_memory_footprint() / 2


def test_8bit_moe_is_refused_with_what_to_set(tmp_path):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(Unavailable, match="4bit"):
        backend("tiny-omni-moe", tmp_path, quantization="8bit")


def test_parked_weights_come_back_and_answer_the_same(tmp_path):
    """The GPU hand-off to diffusion (park) and back (ready), run on the CPU with force."""
    b = backend("tiny-omni", tmp_path)
    before, _, _ = run(b)
    assert b.park() == 0  # a CPU model has no GPU room to give
    assert b.park(force=True) > 0 and b.parked and b._kept == ([], None)
    after, _, _ = run(b)
    assert not b.parked and after == before
    speaking = backend("tiny-omni", tmp_path, talker=True)  # the whole Qwen2.5-Omni moves, vocoder included
    assert speaking.park(force=True) == speaking.talker_model.get_memory_footprint() \
        > speaking.model.get_memory_footprint()


def _engine(tmp_path, **over):
    sets = ["perception.backend=neural", "perception.vl_model=backbone", "llm.context_tokens=1024"]
    return Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "max_new_tokens": "12", **over},
                              sets=sets, env={}))


def test_the_engine_passes_the_turns_picture_and_the_talker_speaks_it(pictures, tmp_path):
    eng = _engine(tmp_path, llm="tiny-omni", tts_backend="talker")
    try:
        s = Session(eng)
        events = list(s.submit(Turn("what is in this picture?", attachments=(str(pictures[0]),), speak=True)))
        done = [e for e in events if e.type == "done"][-1]
        assert done.usage["media_seen"] == ["pic0.png"]
        audio = [e for e in events if e.type == "audio_chunk"]
        assert audio and audio[0].sample_rate == 24000 and len(audio[0].pcm) > 0
        turn = eng.store.turns(s.id)[-1]
        assert turn.meta["speech"]["voice"] == "talker" and any(m.name == "answer.wav" for m in turn.media)
        # a later text turn: the picture is known by its facts, the answer is text only
        events = list(s.submit(Turn("thanks")))
        assert "media_seen" not in [e for e in events if e.type == "done"][-1].usage
    finally:
        eng.close()


def test_a_text_only_llm_says_it_cannot_look_and_the_talker_needs_an_omni_llm(pictures, tmp_path):
    eng = _engine(tmp_path, tts_backend="talker")  # the tiny text LLM
    try:
        events = list(Session(eng).submit(Turn("what is this?", attachments=(str(pictures[0]),), speak=True)))
        notices = " ".join(e.message for e in events if e.type == "notice")
        assert "reads text only" in notices and "omni model" in notices
        assert "no talker" in notices and "--tts-backend piper" in notices
        assert not [e for e in events if e.type == "audio_chunk"]
    finally:
        eng.close()


def test_talker_needs_the_transformers_backend():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="talker"):
        load_config("remote", overrides={"tts_backend": "talker"}, env={})


def test_the_experts_panel_draws_one_band_per_modality(pictures, tmp_path):
    from app.panels import router_view

    b = backend("tiny-omni-moe", tmp_path)
    _, usage, stats = run(b, [Rec("image", pictures[0])])
    image, line = router_view(stats)
    n_layers = len(stats["layers"])
    rows = image.size[1] // (image.size[0] // stats["num_experts"])
    assert rows == 2 * n_layers + 1  # text band, a white line, image band
    assert f"image ({usage['media_tokens']['image']} tokens)" in line and line.index("text") < line.index("image")
    assert "All experts resident" in line


@pytest.mark.gpu
def test_on_cuda_4bit_moe_offload_and_the_diffusion_hand_off(pictures, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    on_device = backend("tiny-omni-moe", tmp_path, quantization="4bit", device="cuda")
    offloaded = backend("tiny-omni-moe", tmp_path, quantization="4bit", device="cuda", vram_gb=0.002)
    a, _, _ = run(on_device, [Rec("image", pictures[0])])
    b, _, stats = run(offloaded, [Rec("image", pictures[0])])
    assert a == b and stats["cache"]["peak_bytes"] <= stats["cache"]["budget_bytes"]
    dense = backend("tiny-omni", tmp_path, device="cuda")
    before, _, _ = run(dense)
    used = torch.cuda.memory_allocated()
    assert dense.park() > 0 and torch.cuda.memory_allocated() < used
    assert run(dense)[0] == before and next(dense.model.parameters()).is_cuda
    speaking = backend("tiny-omni", tmp_path, device="cuda", talker=True)
    assert speaking.park() > 0
    assert not any(p.is_cuda for p in speaking.talker_model.parameters())  # the talker and vocoder too
    speaking.ready()
    assert all(p.is_cuda for p in speaking.talker_model.parameters())


def test_changing_the_speaking_rate_with_the_talker_loads_no_second_model(tmp_path):
    """set_speech rebuilds only the tts role: the talker voice speaks through the LLM already
    loaded (it used to hold a fresh, never-loaded llm role and load the omni model again)."""
    eng = _engine(tmp_path, llm="tiny-omni", tts_backend="talker")
    try:
        llm_role = eng.roles["llm"]
        backend = eng.roles["tts"].get().backend  # the talker voice loads the LLM once
        eng.set_speech(rate=1.3)
        assert eng.roles["llm"] is llm_role
        assert eng.roles["tts"].get().backend is backend
        assert eng.config.tts.rate == 1.3
    finally:
        eng.close()
