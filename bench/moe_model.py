"""The model side of bench/moe.py: a Qwen3-MoE with random weights built in code, and
its experts in NF4 (the bitsandbytes 4-bit format, quantized per expert into plain
tensors so our offload can move them; dequantized with bitsandbytes' kernel when it
is installed and agrees with the reference, else in plain torch)."""
from __future__ import annotations

import torch
from torch import nn

from engine.moe.nf4 import NF4_BLOCK, NF4Expert, configure_nf4, nf4_quantize  # noqa: F401  (the bench uses them)

# Random weights: std = WEIGHT_SCALE / sqrt(hidden) (0.02 at hidden 256, 0.007 at 2048) and unit token
# embeddings, so the token dominates the residual stream and routing is about as uncorrelated between
# consecutive tokens as chance (measured in "routing"). With a fixed 0.02 at hidden 2048, 48 layers of
# random attention averages swamp the token and consecutive tokens share ~70% of their experts
# (chance: 6%), which would flatter any cache.
WEIGHT_SCALE, EMBED_STD = 0.32, 1.0

# -- the model -------------------------------------------------------------------------------
def build_model(shape: dict, dtype, experts: str, fill_device: torch.device, seed: int = 0):
    """A random Qwen3MoeForCausalLM on the CPU, parameters drawn on `fill_device` (fast on CUDA).
    experts: "fused" (transformers' 3D tensors, in `dtype`) or "nf4" (per-expert NF4Expert modules)."""
    import accelerate
    import transformers
    from transformers.activations import ACT2FN

    from engine.moe.families import ExpertList

    config = transformers.Qwen3MoeConfig(**shape, tie_word_embeddings=False, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096)
    with accelerate.init_empty_weights():  # parameters on meta, buffers (rotary) real
        model = transformers.Qwen3MoeForCausalLM(config).eval()
    gen = torch.Generator(fill_device).manual_seed(seed)
    weight_std = WEIGHT_SCALE / shape["hidden_size"] ** 0.5
    draw_dtype = dtype if fill_device.type == "cuda" else torch.float32

    def draw(size, std):
        return torch.randn(size, generator=gen, device=fill_device, dtype=draw_dtype).mul_(std)

    def put(name, tensor):
        prefix, _, leaf = name.rpartition(".")
        model.get_submodule(prefix)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)

    for name, p in list(model.named_parameters()):
        if ".experts." in name:
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = draw(p.shape, EMBED_STD if "embed_tokens" in name else weight_std).to("cpu", dtype)
        put(name, t)
    E, H, I = shape["num_experts"], shape["hidden_size"], shape["moe_intermediate_size"]
    for layer in model.model.layers:
        block = layer.mlp
        if experts == "fused":
            block.experts.gate_up_proj = nn.Parameter(draw((E, 2 * I, H), weight_std).to("cpu", dtype),
                                                      requires_grad=False)
            block.experts.down_proj = nn.Parameter(draw((E, H, I), weight_std).to("cpu", dtype),
                                                   requires_grad=False)
            continue
        mods, chunk = [], 16
        for start in range(0, E, chunk):
            n = min(chunk, E - start)
            gu_q, gu_a = (t.to("cpu") for t in nf4_quantize(draw((n, 2 * I * H), weight_std)))
            dn_q, dn_a = (t.to("cpu") for t in nf4_quantize(draw((n, H * I), weight_std)))
            mods += [NF4Expert(gu_q[j].clone(), gu_a[j].clone(), dn_q[j].clone(), dn_a[j].clone(), I, H,
                               ACT2FN[config.hidden_act]) for j in range(n)]
        block.experts = ExpertList(mods)
    assert not any(p.is_meta for p in model.parameters())
    return model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(model, name: str) -> int:
    if name == "":
        return nbytes(model.parameters())
    try:
        return nbytes(model.get_submodule(name).parameters())
    except AttributeError:
        return nbytes([model.get_parameter(name)])


def expert_bytes(model) -> int:
    from engine.moe.families import find_moe_layers
    return sum(layer.expert_bytes(e) for layer in find_moe_layers(model) for e in range(layer.num_experts))


# -- measuring -------------------------------------------------------------------------------
