"""MoE through the engine: a tiny Qwen3-MoE (built in code) with experts offloaded
under --vram-gb answers exactly like the model without offload, reports its
router statistics per turn, and misconfiguration gets a clear message."""
from __future__ import annotations

import pytest

from engine.config import load_config
from engine.engine import Engine
from engine.session import Session, Turn


def _run(tmp_path, text="tell me about the sea", **over):
    eng = Engine(load_config("tiny", overrides={"llm": "tiny-moe", "data_dir": str(tmp_path), "max_new_tokens": "16",
                                                **over}, env={}))
    try:
        return list(Session(eng).submit(Turn(text)))
    finally:
        eng.close()


def _text(events):
    return "".join(e.text for e in events if e.type == "text_delta")


@pytest.mark.parametrize("vram_gb", ["0.0004", "0.002"])  # ~1/3 of the experts fit; all fit
def test_offloaded_answer_matches_and_router_stats_add_up(tmp_path, vram_gb):
    plain = _run(tmp_path / "plain")
    offloaded = _run(tmp_path / "offload", vram_gb=vram_gb)
    assert _text(offloaded) == _text(plain) and _text(plain)
    stats = [e for e in offloaded if e.type == "router_stats"][-1].experts
    cache = stats["cache"]
    assert cache["peak_bytes"] <= cache["budget_bytes"] and 0.0 <= cache["hit_rate"] <= 1.0
    done = [e for e in offloaded if e.type == "done"][-1]
    tokens = done.usage["prompt_tokens"] + done.usage["completion_tokens"] - 1  # the last token is never run
    for layer in stats["layers"].values():
        assert layer["text"]["tokens"] == tokens
        assert sum(layer["text"]["counts"]) == tokens * stats["top_k"]
    plain_stats = [e for e in plain if e.type == "router_stats"][-1].experts
    assert plain_stats["cache"] is None and plain_stats["layers"] == stats["layers"]  # the same experts fired


def test_small_budget_gives_more_misses(tmp_path):
    small = [e for e in _run(tmp_path / "a", vram_gb="0.0004") if e.type == "router_stats"][-1].experts["cache"]
    large = [e for e in _run(tmp_path / "b", vram_gb="0.002") if e.type == "router_stats"][-1].experts["cache"]
    assert small["evictions"] > 0 and large["evictions"] == 0 and small["hit_rate"] < large["hit_rate"]


def test_budget_too_small_says_what_to_set(tmp_path):
    events = _run(tmp_path, vram_gb="0.00001")
    errors = [e.message for e in events if e.type == "error"]
    assert errors and "--vram-gb 0.00001 is too small" in errors[0] and "or more" in errors[0]


def test_vram_budget_on_a_dense_model_is_refused(tmp_path):
    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "vram_gb": "1"}, env={}))
    try:
        errors = [e.message for e in Session(eng).submit(Turn("hi")) if e.type == "error"]
        assert errors and "MoE" in errors[0]
    finally:
        eng.close()


def test_gpu_profile_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    eng = Engine(load_config("gpu", overrides={"data_dir": str(tmp_path), "llm": "tiny-moe"}, env={}))
    try:
        errors = [e.message for e in Session(eng).submit(Turn("hi")) if e.type == "error"]
        assert errors and "CUDA" in errors[0] and "cpu" in errors[0].lower()
    finally:
        eng.close()


def test_router_heatmap_image_comes_from_the_conversations_own_answer(tmp_path):
    """The Experts panel shows the stats stored with this conversation's last answer; another
    conversation (here: a new one) shows none, whatever the engine answered last."""
    from app.panels import router_panel, router_view

    eng = Engine(load_config("tiny", overrides={"llm": "tiny-moe", "data_dir": str(tmp_path), "max_new_tokens": "8",
                                                "vram_gb": "0.0004"}, env={}))
    try:
        s = Session(eng)
        events = list(s.submit(Turn("tell me about the sea")))
        stats = [e for e in events if e.type == "router_stats"][-1].experts
        image, text = router_view(stats)
        assert image.size[0] >= 8 and image.size[1] >= 2 and "hit rate" in text
        assert eng.store.turns(s.id)[-1].meta["router_stats"] == stats
        image, text = router_panel(eng, s.id)
        assert image is not None and "hit rate" in text
        other = eng.store.create_conversation("other")
        assert router_panel(eng, other)[0] is None
    finally:
        eng.close()


def test_an_api_turn_does_not_change_the_experts_another_conversation_shows(tmp_path):
    """Per-turn results travel in the turn's events and its stored turn, not on the shared
    engine: an API completion (an MoE answer with experts of its own) leaves the Experts
    panel of a browser conversation as its own last answer left it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.api import make_router
    from app.panels import router_panel, router_view
    from engine.events import CancelToken

    eng = Engine(load_config("tiny", overrides={"llm": "tiny-moe", "data_dir": str(tmp_path), "max_new_tokens": "8",
                                                "vram_gb": "0.0004"}, env={}))
    try:
        s = Session(eng)
        list(s.submit(Turn("tell me about the sea")))
        shown = router_panel(eng, s.id)[1]
        app = FastAPI()
        app.include_router(make_router(eng))
        asked = [{"role": "user", "content": "what do mountains look like in winter, and why?"}]
        r = TestClient(app).post("/v1/chat/completions", json={"model": "tiny", "messages": asked, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert router_panel(eng, s.id)[1] == shown
        # (the API's answer had experts of its own: a panel reading the engine's last answer would differ)
        api = [e for e in eng.complete(asked, eng.params(8), CancelToken()) if e.type == "router_stats"][-1]
        assert router_view(api.experts)[1] != shown
    finally:
        eng.close()


def test_a_diffusion_generator_takes_the_experts_gpu_room_and_they_come_back(tmp_path):
    """One GPU for the LLM and the generators: running a diffusion pipeline first evicts the
    LLM's cached experts; the next answer loads them again through the cache."""
    eng = Engine(load_config("tiny", overrides={"llm": "tiny-moe", "data_dir": str(tmp_path), "max_new_tokens": "8",
                                                "vram_gb": "0.002"}, env={}))
    try:
        s = Session(eng)
        list(s.submit(Turn("hello")))
        cache = eng.roles["llm"].loaded.moe.cache
        assert cache.used > 0
        events = list(s.submit(Turn("draw a lighthouse at dusk, 64x64")))
        assert any(e.type == "media_result" and e.meta["backend"] == "diffusion" for e in events)
        assert cache.used == 0  # the experts left the (GPU) room to the pipeline
        events = list(s.submit(Turn("and now tell me a story")))
        stats = [e for e in events if e.type == "router_stats"][-1].experts["cache"]
        assert stats["misses"] > 0 and cache.used > 0  # and came back on demand
    finally:
        eng.close()


def test_nf4_experts_are_close_smaller_and_offload(tmp_path):
    """4-bit experts (llm.expert_quantization=nf4): about 1/7 of the fp32 expert bytes, the
    same router statistics shape, and next-token logits close to the full-precision model."""
    import torch

    from engine.llm.tiny import build_tiny_moe
    from engine.moe.families import find_moe_layers
    from engine.moe.nf4 import quantize_experts

    ref, _ = build_tiny_moe(0)
    quant, _ = build_tiny_moe(0)
    before = sum(l.expert_bytes(e) for l in find_moe_layers(quant) for e in range(l.num_experts))
    assert quantize_experts(quant) == 16
    after = sum(l.expert_bytes(e) for l in find_moe_layers(quant) for e in range(l.num_experts))
    assert after < before / 6
    from engine.moe.nf4 import nf4_dequant_torch, nf4_quantize

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    packed, absmax = nf4_quantize(w.reshape(-1))
    back = nf4_dequant_torch(packed, absmax, w.shape, torch.float32)
    assert (back - w).norm() / w.norm() < 0.12  # NF4 on Gaussian weights: ~9% relative error
    # each expert chains three such matrices (gate, up, down): about sqrt(3) x that, and no more
    x = torch.randn(5, ref.config.hidden_size, generator=torch.Generator().manual_seed(4))
    ref_layer, q_layer = find_moe_layers(ref)[0], find_moe_layers(quant)[0]
    with torch.inference_mode():
        for e in range(ref_layer.num_experts):
            want, got = ref_layer.run_expert(e, x), q_layer.run_expert(e, x)
            assert (got - want).norm() / want.norm() < 0.2
        # the whole model (routing may flip where two experts score alike): still the same picture
        ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
        a, b = ref(ids).logits[0, -1], quant(ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95
    events = _run(tmp_path, vram_gb="0.0003", **{"llm.expert_quantization": "nf4"})
    stats = [e for e in events if e.type == "router_stats"][-1].experts
    assert stats["expert_format"].startswith("nf4") and stats["cache"]["peak_bytes"] <= stats["cache"]["budget_bytes"]
    assert _text(events)
