"""MoE models in the transformers backend: expert offload within a VRAM budget
(`--vram-gb`) and per-turn router statistics (the RouterStats event).

Attached only when the loaded model has MoE blocks; a dense model is untouched.
"""
from __future__ import annotations

from engine.errors import Unavailable

GiB = 1 << 30
HEADROOM = 0.15  # of the budget kept free for the KV cache and activations


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GB" if n >= 0.1 * GiB else f"{n / 2**20:.2f} MB"


def _gb(x: float) -> str:
    import numpy as np

    return np.format_float_positional(x, precision=4, unique=True, fractional=False, trim="-")


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class MoERuntime:
    def __init__(self, model, layers, vram_gb: float, device: str, prefetch: bool, nf4: bool = False) -> None:
        from engine.moe.families import find_moe_layers
        from engine.moe.offload import min_budget_bytes, offload_experts
        from engine.moe.stats import RouterStats

        self.dequant = None  # with NF4 experts: which dequantizer runs (bitsandbytes' kernel or plain torch)
        if nf4:
            import torch

            from engine.moe.nf4 import configure_nf4, quantize_experts

            quantize_experts(model)
            self.dequant = configure_nf4(torch.device(device), torch.float16)
            layers = find_moe_layers(model)  # the blocks now hold NF4 experts
        self.layers = layers
        self.cache = None
        if vram_gb > 0:
            experts = sum(layer.expert_bytes(e) for layer in layers for e in range(layer.num_experts))
            shared = _param_bytes(model) - experts
            budget = int(vram_gb * GiB * (1 - HEADROOM)) - shared
            need = min_budget_bytes(layers)
            if budget < need:
                least = (shared + need) / (1 - HEADROOM) / GiB
                raise Unavailable(f"--vram-gb {_gb(vram_gb)} is too small for this model: its shared weights take "
                                  f"{_size(shared)} and its largest expert {_size(need)}",
                                  f"set --vram-gb {_gb(least)} or more")
            self.cache = offload_experts(model, device, budget, prefetch=prefetch)
            self.budget_bytes, self.expert_bytes = budget, experts
        else:
            model.to(device)  # everything on the device (MoE models are loaded on the CPU first)
        self.stats = RouterStats(layers)

    @classmethod
    def attach(cls, model, cfg, device: str) -> "MoERuntime | None":
        from engine.moe.families import find_moe_layers, is_moe_block

        has_moe = any(is_moe_block(m) for m in model.modules())
        layers = find_moe_layers(model) if has_moe else []  # (an MoE of an unknown family: a clear error)
        if not layers:
            if cfg.vram_gb > 0:
                raise Unavailable(f"--vram-gb offloads the experts of MoE models; {type(model).__name__} has none",
                                  "drop --vram-gb, or choose an MoE model (Qwen3-30B-A3B, OLMoE, Mixtral)")
            if cfg.expert_quantization == "nf4":
                raise Unavailable("llm.expert_quantization applies to MoE models", "set it back to auto")
            return None
        # bitsandbytes quantizes the linear layers but not fused expert tensors: with --quantization,
        # the experts are ours in NF4 ("auto"), moved by the cache like any tensor
        nf4 = cfg.expert_quantization == "nf4" or (cfg.expert_quantization == "auto" and cfg.quantization != "none")
        return cls(model, layers, cfg.vram_gb, device, cfg.expert_prefetch, nf4)

    def begin_turn(self) -> None:
        self.stats.reset()
        if self.cache is not None:
            self.cache.reset_stats()

    def summary(self) -> dict:
        """What the RouterStats event carries: per MoE layer and modality, expert counts;
        the expert cache's hit rate and traffic when experts are offloaded."""
        info = self.stats.layer_info()
        return {"layers": {str(i): {"layer": info[i]["layer"], **mods} for i, mods in self.stats.summary().items()},
                "num_experts": self.layers[0].num_experts, "top_k": self.layers[0].top_k,
                "expert_format": f"nf4, {self.dequant}" if self.dequant else "native",
                "cache": self.cache.stats() if self.cache is not None else None}
