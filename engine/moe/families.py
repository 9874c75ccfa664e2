"""Find the MoE blocks of a transformers model, one interface for both layouts.

transformers 5.x stores a block's experts FUSED: `block.experts.gate_up_proj`
[E, 2I, H] and `block.experts.down_proj` [E, H, I] (nn.Parameters), with
`block.gate` a TopKRouter returning (logits, top-k weights, top-k indices).
transformers 4.x (and `unfuse_experts` below, which bitsandbytes can quantize
because every expert becomes nn.Linear modules) keeps a ModuleList of
per-expert MLPs; 4.x routers were a bare nn.Linear whose logits the block
turned into top-k weights itself. `MoELayer` hides those differences: `route`
gives the block's own top-k weights and indices, `run_expert` runs one expert
from a dict of its tensors (so the tensors may live anywhere), and `combine`
adds the expert outputs exactly like the original eager forward.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# model_type prefix -> the transformers class it was written against. The
# block structure (gate + experts [+ shared_expert]) is what is detected, so
# the multimodal variants of the same families are found the same way.
FAMILIES = {
    "qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration (thinker and talker)",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

# 4.x blocks with an nn.Linear router that always renormalised the top-k.
_ALWAYS_NORM = ("mixtral",)


def family_of(model: nn.Module) -> str:
    """The supported family of `model`, or a ValueError listing them."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    for prefix in FAMILIES:
        if model_type.startswith(prefix):
            return prefix
    known = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
    raise ValueError(f"model_type {model_type!r} is not a supported MoE family; supported: {known}")


def _is_fused(experts: nn.Module) -> bool:
    up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3


def is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    if getattr(module, "gate", None) is None or experts is None:
        return False
    return _is_fused(experts) or isinstance(experts, nn.ModuleList)


@dataclass(eq=False)
class MoELayer:
    """One sparse MoE block: its router, its experts and how to run them."""

    index: int  # position among the model's MoE layers (0..n-1)
    layer_idx: int  # decoder layer number inside its stack
    name: str  # module path, e.g. "model.layers.3.mlp"
    family: str
    block: nn.Module
    num_experts: int
    top_k: int
    layout: str  # "fused" or "modulelist"
    norm_topk: bool  # only used for 4.x nn.Linear routers
    next: "MoELayer | None" = field(default=None, repr=False)  # next MoE layer, same stack

    @property
    def router(self) -> nn.Module:
        return self.block.gate

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @property
    def legacy_router(self) -> bool:
        """A 4.x nn.Linear router: the block returned (hidden, router_logits)."""
        return isinstance(self.router, nn.Linear)

    def route(self, h: torch.Tensor, hooks: bool = True):
        """(top-k weights [T,k], top-k indices [T,k], router logits [T,E]) for h [T,H].

        hooks=False calls the router's forward directly so that a lookahead
        guess is not seen by forward hooks (router stats, output_router_logits)."""
        call = self.router if hooks else self.router.forward
        out = call(h)
        if isinstance(out, tuple):
            logits, weights, indices = out
            return weights, indices, logits
        probs = F.softmax(out, dim=1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), indices, out

    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's weights as views of the model's own storage."""
        if self.layout == "fused":
            ex = self.experts
            names = [n for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
                     if isinstance(getattr(ex, n, None), torch.Tensor)]
            return {n: getattr(ex, n).data[e] for n in names}
        module = self.experts[e]
        tensors = {n: p.data for n, p in module.named_parameters()}
        tensors.update({n: b for n, b in module.named_buffers()})
        return tensors

    def expert_bytes(self, e: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.expert_tensors(e).values())

    def run_expert(self, e: int, x: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None):
        """Expert e on x [n, H]; `tensors` (from expert_tensors, maybe elsewhere) replace its weights."""
        tensors = self.expert_tensors(e) if tensors is None else tensors
        if self.layout == "modulelist":
            return torch.func.functional_call(self.experts[e], tensors, (x,))
        return _fused_expert(self.experts, tensors, x)

    def shared_output(self, h: torch.Tensor) -> torch.Tensor | None:
        """The always-on shared expert (Qwen2-MoE, Qwen3-Omni talker), gated like the original."""
        shared = getattr(self.block, "shared_expert", None)
        if shared is None:
            return None
        out = shared(h)
        gate = getattr(self.block, "shared_expert_gate", None)
        return out if gate is None else F.sigmoid(gate(h)) * out

    def combine(self, h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                get: Callable[[int], dict[str, torch.Tensor] | None] = lambda e: None) -> torch.Tensor:
        """The experts' weighted sum for h [T,H], in the original's order (ascending expert)."""
        out = torch.zeros_like(h)
        by_slot = indices.t()  # [k, T], as the original's one-hot mask is laid out
        for e in torch.unique(indices).tolist():
            pos, tok = torch.where(by_slot == e)
            y = self.run_expert(e, h[tok], get(e)) * weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        shared = self.shared_output(h)
        return out if shared is None else out + shared

    def forward(self, hidden_states: torch.Tensor, get=lambda e: None):
        """The block's forward rebuilt from route + combine (what offload swaps in)."""
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        weights, indices, logits = self.route(h)
        out = self.combine(h, weights, indices, get).reshape(shape)
        return (out, logits) if self.legacy_router else out


def _fused_expert(experts: nn.Module, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    transposed = getattr(experts, "is_transposed", False)

    def linear(inp, w, b):
        y = inp @ w if transposed else F.linear(inp, w)
        return y if b is None else y + b

    gate_up = linear(x, t["gate_up_proj"], t.get("gate_up_proj_bias"))
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        h = apply_gate(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    return linear(h, t["down_proj"], t.get("down_proj_bias"))


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of `model`, in module order, linked to the next
    MoE layer of the same stack (the prefetch target)."""
    family = family_of(model)
    config = model.config
    layers: list[MoELayer] = []
    for name, module in model.named_modules():
        if not is_moe_block(module):
            continue
        experts, router = module.experts, module.gate
        fused = _is_fused(experts)
        num = experts.gate_up_proj.shape[0] if fused else len(experts)
        top_k = getattr(router, "top_k", None) or getattr(module, "top_k", None)
        top_k = top_k or _config_attr(config, "num_experts_per_tok")
        norm = family in _ALWAYS_NORM or bool(getattr(module, "norm_topk_prob", False))
        match = re.search(r"layers\.(\d+)\.", name)
        layers.append(MoELayer(len(layers), int(match.group(1)) if match else len(layers), name, family,
                               module, int(num), int(top_k), "fused" if fused else "modulelist", norm))
    if not layers:
        raise ValueError(f"no MoE blocks (gate + experts) found in {type(model).__name__}")
    for a, b in zip(layers, layers[1:]):
        if _stack(a.name) == _stack(b.name):
            a.next = b
    return layers


def _stack(name: str) -> str:
    return name.split("layers.")[0]


def _config_attr(config, key: str):
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "thinker_config", None)):
        if cfg is not None and getattr(cfg, key, None) is not None:
            return getattr(cfg, key)
    raise ValueError(f"cannot find {key} in {type(config).__name__}")


class ExpertMLP(nn.Module):
    """One expert as nn.Linear layers (the 4.x layout), so bnb can quantize it."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> None:
        super().__init__()
        inter, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
        self.gate_proj = nn.Linear(hidden, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=down.device, dtype=down.dtype)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inter])
            self.up_proj.weight.copy_(gate_up[inter:])
            self.down_proj.weight.copy_(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """A ModuleList of experts callable like the fused module: (h, top_k_index, top_k_weights)."""

    def forward(self, h: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(h)
        by_slot = top_k_index.t()
        for e in torch.unique(top_k_index).tolist():
            pos, tok = torch.where(by_slot == e)
            y = self[e](h[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Turn every fused experts module into an ExpertList of ExpertMLPs, in place.

    The blocks' own forwards keep working. Only the default layout (concatenated
    gate/up, no bias, not transposed) is converted; others raise."""
    for layer in find_moe_layers(model):
        ex = layer.experts
        if layer.layout != "fused":
            continue
        if getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False) \
                or not getattr(ex, "is_concatenated", True):
            raise ValueError(f"{layer.name}: only concatenated, unbiased, untransposed experts can be unfused")
        layer.block.experts = ExpertList(
            ExpertMLP(ex.gate_up_proj.data[e], ex.down_proj.data[e], ex.act_fn) for e in range(layer.num_experts))
    return model
