"""NF4 experts: each expert's weights in 4-bit NormalFloat (the bitsandbytes format,
blocks of 64 with a float32 absmax each), held as plain uint8/float32 tensors so the
expert cache moves them like any tensor (about 1/7 of fp32, 1/3.6 of fp16, in memory
and in transfer), dequantized when the expert runs: with bitsandbytes' kernel on CUDA
when it is installed and agrees with the reference, else in plain torch (CPU too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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




def quantize_experts(model: nn.Module) -> int:
    """Replace every expert of `model` by an NF4Expert, in place (fused experts are unfused
    first). Returns the number of experts quantized. Weights whose row length is not a
    multiple of 64 cannot be blocked and raise ValueError."""
    from engine.moe.families import ExpertList, ExpertMLP, find_moe_layers, unfuse_experts

    unfuse_experts(model)
    count = 0
    for layer in find_moe_layers(model):
        experts = []
        for mlp in layer.experts:
            if not isinstance(mlp, ExpertMLP):
                raise ValueError(f"{layer.name}: only SwiGLU experts can be quantized to NF4")
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            down = mlp.down_proj.weight.detach()
            inter, hidden = down.shape[1], down.shape[0]
            if (2 * inter * hidden) % NF4_BLOCK or (hidden * inter) % NF4_BLOCK:
                raise ValueError(f"{layer.name}: expert weights are not a multiple of {NF4_BLOCK} values")
            gu_q, gu_a = nf4_quantize(gate_up.reshape(-1))
            dn_q, dn_a = nf4_quantize(down.reshape(-1))
            experts.append(NF4Expert(gu_q, gu_a, dn_q, dn_a, inter, hidden, mlp.act_fn))
            count += 1
        layer.block.experts = ExpertList(experts)
    return count
