"""engine/moe on tiny random MoE models of each family, built in code.

The offloaded model (experts behind an LRU cache too small for them) must
give the unmodified model's logits and greedy tokens, in both expert layouts
(transformers 5.x fused tensors, and per-expert modules); the cache must never
exceed its budget; router stats must count every (token, slot) once, per
modality. On CPU the "fast device" is the CPU itself and the cache holds
private copies; the CUDA path (pinned memory, side-stream prefetch) is
checked by the gpu-marked test.
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.moe.families import find_moe_layers, family_of, unfuse_experts  # noqa: E402
from engine.moe.offload import min_budget_bytes, offload_experts, restore_forwards  # noqa: E402
from engine.moe.stats import RouterStats  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=16, num_experts=8, head_dim=8,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=16, num_experts=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=16, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                       num_experts=8)),
}
N_EXPERTS, TOP_K, N_LAYERS = 8, 2, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str, unfused: bool = False):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None  # always 8 new tokens
    model.generation_config.pad_token_id = 0
    return unfuse_experts(model) if unfused else model


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, COMMON["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def run(model, ids):
    logits = model(ids).logits
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return logits, tokens


def budget_checked(cache) -> list[int]:
    """Record the resident bytes after every load, asserting the budget each time."""
    seen: list[int] = []

    def check(c):
        assert c.used <= c.budget
        assert sum(e.size for e in c.resident.values()) == c.used
        seen.append(c.used)

    cache.on_load.append(check)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_every_moe_block(family):
    model = tiny_model(family)
    layers = find_moe_layers(model)
    assert family_of(model) == family and {la.family for la in layers} == {family}
    assert [(la.layer_idx, la.num_experts, la.top_k, la.layout) for la in layers] == \
        [(i, N_EXPERTS, TOP_K, "fused") for i in range(N_LAYERS)]
    assert layers[0].next is layers[1] and layers[1].next is None
    unfused = find_moe_layers(tiny_model(family, unfused=True))
    assert {la.layout for la in unfused} == {"modulelist"}


@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "modulelist"])
@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_model_matches_the_original(family, unfused, batch):
    model = tiny_model(family, unfused)
    ref_logits, ref_tokens = run(model, batch)
    one = min_budget_bytes(find_moe_layers(model))
    cache = offload_experts(model, "cpu", 3 * one, prefetch=True)
    seen = budget_checked(cache)
    logits, tokens = run(model, batch)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens) and tokens.shape[1] == batch.shape[1] + 8
    stats = cache.stats()
    assert seen and max(seen) <= 3 * one and stats["peak_bytes"] <= stats["budget_bytes"]
    assert 0.0 <= stats["hit_rate"] <= 1.0 and stats["misses"] > 0
    assert stats["bytes_moved"] == (stats["misses"] + stats["prefetch_loads"]) * one


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_bigger_budget_gives_a_higher_hit_rate(family, batch):
    rates = []
    for n_experts in (3, N_EXPERTS * N_LAYERS):
        model = tiny_model(family)
        one = min_budget_bytes(find_moe_layers(model))
        cache = offload_experts(model, "cpu", n_experts * one, prefetch=False)
        budget_checked(cache)
        run(model, batch)
        rates.append(cache.stats()["hit_rate"])
    small, big = rates
    assert 0.0 <= small < big <= 1.0
    assert big > 0.7  # everything fits: only the first use of each expert misses


def test_prefetch_reports_its_accuracy(batch):
    model = tiny_model("qwen3_moe")
    ref_logits, ref_tokens = run(model, batch)
    one = min_budget_bytes(find_moe_layers(model))
    cache = offload_experts(model, "cpu", 8 * one, prefetch=True)
    seen = budget_checked(cache)
    logits, tokens = run(model, batch)
    stats = cache.stats()
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0) and torch.equal(tokens, ref_tokens)
    assert stats["prefetch_guessed"] > 0 and stats["prefetch_loads"] > 0
    assert 0.0 <= stats["prefetch_accuracy"] <= 1.0
    assert 0 <= stats["prefetch_useful"] <= stats["prefetch_loads"] and max(seen) <= 8 * one
    off = tiny_model("qwen3_moe")
    no_prefetch = offload_experts(off, "cpu", 8 * one, prefetch=False)
    run(off, batch)
    assert no_prefetch.stats()["prefetch_accuracy"] is None and no_prefetch.stats()["prefetch_loads"] == 0


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_router_stats_count_every_token_per_modality(family, batch):
    image = torch.zeros_like(batch, dtype=torch.bool)
    image[:, 1:4] = True
    masks = {"text": ~image, "image": image}
    summaries = []
    for offload in (False, True):
        model = tiny_model(family)
        if offload:  # the prefetch lookahead must not be counted
            offload_experts(model, "cpu", 3 * min_budget_bytes(find_moe_layers(model)), prefetch=True)
        with RouterStats(model) as rs:
            rs.set_modalities(masks)
            with torch.no_grad():
                model(batch)
            summaries.append(rs.summary())
            info = rs.layer_info()
    plain, offloaded = summaries
    assert plain == offloaded
    assert sorted(plain) == [0, 1] and info[1]["name"] == "model.layers.1.mlp"
    for per_mod in plain.values():
        assert set(per_mod) == {"text", "image"}
        for name, mask in masks.items():
            s = per_mod[name]
            assert s["tokens"] == int(mask.sum()) and len(s["counts"]) == N_EXPERTS
            assert sum(s["counts"]) == int(mask.sum()) * TOP_K
            assert 0.0 <= s["entropy"] <= 3.0 and s["top"][0][1] == max(s["counts"])


def test_router_stats_put_decode_steps_under_text_and_uncovered_tokens_under_other(batch):
    model = tiny_model("olmoe")
    image = torch.zeros_like(batch, dtype=torch.bool)
    image[:, :2] = True
    audio = torch.zeros_like(batch, dtype=torch.bool)
    audio[:, 2:3] = True
    with RouterStats(model) as rs:
        rs.set_modalities({"image": image, "audio": audio})
        run(model, batch)
        summary = rs.summary()
    assert rs._handles == []
    prompt_other = int((~(image | audio)).sum())
    decode_text = batch.shape[0] * 7  # generate's 7 decode forwards, one token per row
    for per_mod in summary.values():
        assert sum(per_mod["image"]["counts"]) == 2 * int(image.sum()) * TOP_K  # forward + generate's prefill
        assert sum(per_mod["audio"]["counts"]) == 2 * int(audio.sum()) * TOP_K
        assert sum(per_mod["other"]["counts"]) == 2 * prompt_other * TOP_K
        assert per_mod["text"]["tokens"] == decode_text
    with pytest.raises(ValueError, match="same number of tokens"):
        RouterStats(model).set_modalities({"a": image, "b": image[:, :3]})


def test_a_budget_below_one_expert_is_refused_with_the_minimum():
    model = tiny_model("mixtral")
    one = min_budget_bytes(find_moe_layers(model))
    with pytest.raises(ValueError, match=f"minimum is {one} bytes"):
        offload_experts(model, "cpu", one - 1)
    assert all("forward" not in la.block.__dict__ for la in find_moe_layers(model))
    cache = offload_experts(model, "cpu", one, prefetch=True)  # exactly one expert still works
    seen = budget_checked(cache)
    run(model, torch.randint(0, 128, (1, 4)))
    assert set(seen) == {one} and cache.stats()["resident_experts"] == 1
    with pytest.raises(ValueError, match="already offloaded"):
        offload_experts(model, "cpu", 4 * one)
    restore_forwards(cache)
    assert all("forward" not in la.block.__dict__ for la in cache.layers)


def test_unsupported_models_are_named():
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=16))
    with pytest.raises(ValueError, match="not a supported MoE family.*qwen3_moe"):
        find_moe_layers(dense)


def test_legacy_linear_router_routes_like_the_topk_router(batch):
    """4.x blocks had an nn.Linear gate and returned (hidden, router_logits)."""
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[0]
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer.block(h[None])[0]
        legacy = copy.deepcopy(model)
        for la in find_moe_layers(legacy):
            gate = torch.nn.Linear(32, N_EXPERTS, bias=False)
            gate.weight.copy_(la.router.weight)
            la.block.gate, la.block.norm_topk_prob = gate, True
        old = find_moe_layers(legacy)[0]
        assert old.legacy_router and old.norm_topk
        out, logits = old.forward(h[None])
    assert torch.allclose(out[0], expected, atol=1e-6) and logits.shape == (5, N_EXPERTS)


def test_qwen3_omni_thinker_text_model(batch):
    from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as cfg_mod
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as model_mod

    extra = FAMILIES["qwen3_moe"][2]
    config = cfg_mod.Qwen3OmniMoeTextConfig(**COMMON, **extra)
    torch.manual_seed(0)
    model = model_mod.Qwen3OmniMoeThinkerTextModel(config).eval()
    with torch.no_grad():
        expected = model(input_ids=batch).last_hidden_state
        layers = find_moe_layers(model)
        assert [la.family for la in layers] == ["qwen3_omni_moe"] * N_LAYERS
        offload_experts(model, "cpu", 3 * min_budget_bytes(layers))
        got = model(input_ids=batch).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_offload_with_side_stream_prefetch(batch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("qwen3_moe")
    ref_logits, ref_tokens = run(model, batch)
    one = min_budget_bytes(find_moe_layers(model))
    cache = offload_experts(model, "cuda", 4 * one, prefetch=True)
    layer = cache.layers[0]
    assert model.lm_head.weight.is_cuda and layer.router.weight.is_cuda
    assert layer.experts.gate_up_proj.device.type == "cpu" and layer.experts.gate_up_proj.is_pinned()
    logits, tokens = run(model, batch.cuda())
    assert torch.allclose(logits.cpu(), ref_logits, atol=1e-4) and torch.equal(tokens.cpu(), ref_tokens)
    assert cache.stats()["peak_bytes"] <= 4 * one and cache.stats()["prefetch_loads"] > 0
