"""The model side of bench/moe.py: a Qwen3-MoE with random weights built in code, and
its experts in NF4 (the bitsandbytes 4-bit format, quantized per expert into plain
tensors so our offload can move them; dequantized with bitsandbytes' kernel when it
is installed and agrees with the reference, else in plain torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

# Random weights: std = WEIGHT_SCALE / sqrt(hidden) (0.02 at hidden 256, 0.007 at 2048) and unit token
# embeddings, so the token dominates the residual stream and routing is about as uncorrelated between
# consecutive tokens as chance (measured in "routing"). With a fixed 0.02 at hidden 2048, 48 layers of
# random attention averages swamp the token and consecutive tokens share ~70% of their experts
# (chance: 6%), which would flatter any cache.
WEIGHT_SCALE, EMBED_STD = 0.32, 1.0

# -- NF4 (the bitsandbytes format) -----------------------------------------------------------
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]
NF4_BLOCK = 64
_codes: dict[torch.device, torch.Tensor] = {}
_bnb_dequant = None  # set by configure_nf4 when bitsandbytes' kernel passes the check


def _code(device) -> torch.Tensor:
    device = torch.device(device)
    if device not in _codes:
        _codes[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _codes[device]


def nf4_quantize(w: torch.Tensor):
    """w [..., n] (n % 64 == 0) -> packed uint8 [..., n/2] (first value in the high nibble),
    float32 absmax [..., n/64]: bitsandbytes' NF4 layout, blocks along the flattened weight."""
    lead, n = w.shape[:-1], w.shape[-1]
    blocks = w.float().reshape(*lead, n // NF4_BLOCK, NF4_BLOCK)
    absmax = blocks.abs().amax(-1).clamp_min(1e-12)
    code = _code(w.device)
    idx = torch.bucketize(blocks / absmax[..., None], (code[1:] + code[:-1]) / 2).to(torch.uint8)
    idx = idx.reshape(*lead, n)
    return (idx[..., 0::2] << 4) | idx[..., 1::2], absmax


def nf4_dequant_torch(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype) -> torch.Tensor:
    idx = torch.stack((packed >> 4, packed & 15), -1).reshape(-1).long()
    w = _code(packed.device)[idx].view(-1, NF4_BLOCK) * absmax.reshape(-1, 1)
    return w.view(shape).to(dtype)


def nf4_dequant(packed, absmax, shape, dtype) -> torch.Tensor:
    if _bnb_dequant is not None and packed.is_cuda:
        return _bnb_dequant(packed, absmax, shape, dtype)
    return nf4_dequant_torch(packed, absmax, shape, dtype)


def configure_nf4(device: torch.device, dtype) -> str:
    """Use bitsandbytes' dequantize kernel on CUDA when it is importable and matches the reference."""
    global _bnb_dequant
    if device.type != "cuda":
        return "plain torch (bitsandbytes' kernel needs CUDA)"
    try:
        import bitsandbytes.functional as bf
    except Exception as exc:  # noqa: BLE001 - any import failure means no kernel
        return f"plain torch (bitsandbytes unavailable: {type(exc).__name__}: {exc})"[:200]

    def dequant(packed, absmax, shape, dt):
        state = bf.QuantState(absmax=absmax, shape=torch.Size(shape), code=_code(packed.device),
                              blocksize=NF4_BLOCK, quant_type="nf4", dtype=dt)
        return bf.dequantize_4bit(packed.reshape(-1, 1), quant_state=state)

    try:
        w = torch.randn(96, 256, device=device, generator=torch.Generator(device).manual_seed(7))
        packed, absmax = nf4_quantize(w)
        ref = nf4_dequant_torch(packed, absmax, w.shape, dtype)
        got = dequant(packed, absmax, w.shape, dtype)
        if not torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-6):
            return "plain torch (bitsandbytes' dequantize_4bit disagreed with the NF4 reference)"
    except Exception as exc:  # noqa: BLE001
        return f"plain torch (bitsandbytes' dequantize_4bit failed: {type(exc).__name__}: {exc})"[:200]
    _bnb_dequant = dequant
    import bitsandbytes
    return f"bitsandbytes {bitsandbytes.__version__} dequantize_4bit"


class NF4Expert(nn.Module):
    """One SwiGLU expert with NF4 weights held as plain (uint8 / float32) parameters, so that
    engine.moe.offload and accelerate move them like any tensor; dequantized at each call."""

    def __init__(self, gate_up_q, gate_up_absmax, down_q, down_absmax, inter: int, hidden: int, act_fn):
        super().__init__()
        self.gate_up_q = nn.Parameter(gate_up_q, requires_grad=False)
        self.gate_up_absmax = nn.Parameter(gate_up_absmax, requires_grad=False)
        self.down_q = nn.Parameter(down_q, requires_grad=False)
        self.down_absmax = nn.Parameter(down_absmax, requires_grad=False)
        self.inter, self.hidden, self.act_fn = inter, hidden, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nf4_dequant(self.gate_up_q, self.gate_up_absmax, (2 * self.inter, self.hidden), x.dtype)
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        w = nf4_dequant(self.down_q, self.down_absmax, (self.hidden, self.inter), x.dtype)
        return F.linear(self.act_fn(gate) * up, w)


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
