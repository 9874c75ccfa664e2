"""Router introspection: which experts each token went to, by modality.

Forward hooks on every MoE router record the top-k expert indices of each
forward. Tokens are grouped by per-token boolean masks you pass in
({"text": mask, "image": mask, ...}, each [batch, seq] or flat, in the order
the block flattens its input); a forward whose token count does not match the
masks (a decode step after the prompt) is counted under `default_modality`,
and tokens no mask covers go to "other". The lookahead routing done by expert
prefetch bypasses hooks, so it is never counted. `summary()` returns plain
dicts; the engine wraps them in its RouterStats event.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.moe.families import MoELayer, find_moe_layers


class RouterStats:
    """Counts per MoE layer, per modality, per expert; a context manager that
    removes its hooks on exit."""

    def __init__(self, model: nn.Module | list[MoELayer], default_modality: str = "text") -> None:
        self.layers = model if isinstance(model, list) else find_moe_layers(model)
        self.default_modality = default_modality
        self._masks: dict[str, torch.Tensor] | None = None
        self.counts: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens: dict[int, dict[str, int]] = {}
        self.forwards = 0
        self._handles = [layer.router.register_forward_hook(self._hook(layer)) for layer in self.layers]

    def set_modalities(self, masks: dict[str, torch.Tensor] | None) -> None:
        """Per-token masks for the forwards with that many tokens (the prompt)."""
        if masks is None:
            self._masks = None
            return
        flat = {name: m.detach().reshape(-1).to("cpu", torch.bool) for name, m in masks.items()}
        sizes = {m.numel() for m in flat.values()}
        if len(sizes) != 1:
            raise ValueError(f"modality masks must all have the same number of tokens, got {sorted(sizes)}")
        self._masks = flat

    def reset(self) -> None:
        self.counts.clear()
        self.tokens.clear()
        self.forwards = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RouterStats":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _groups(self, n_tokens: int) -> dict[str, torch.Tensor]:
        masks = self._masks
        if not masks or next(iter(masks.values())).numel() != n_tokens:
            return {self.default_modality: torch.ones(n_tokens, dtype=torch.bool)}
        groups = dict(masks)
        rest = ~torch.stack(list(masks.values())).any(dim=0)
        if rest.any():
            groups["other"] = rest
        return groups

    def _hook(self, layer: MoELayer):
        def hook(module, args, output):
            if isinstance(output, tuple):
                indices = output[2]
            else:  # a 4.x nn.Linear router: its logits, top-k taken by the block
                indices = torch.topk(output, layer.top_k, dim=-1).indices
            indices = indices.detach().reshape(-1, layer.top_k).cpu()
            if layer.index == self.layers[0].index:
                self.forwards += 1
            counts = self.counts.setdefault(layer.index, {})
            tokens = self.tokens.setdefault(layer.index, {})
            for name, mask in self._groups(indices.shape[0]).items():
                chosen = indices[mask].reshape(-1)
                add = torch.bincount(chosen, minlength=layer.num_experts)
                counts[name] = counts.get(name, torch.zeros(layer.num_experts, dtype=torch.long)) + add
                tokens[name] = tokens.get(name, 0) + int(mask.sum())

        return hook

    def summary(self, top: int = 3) -> dict[int, dict[str, dict]]:
        """{moe layer index: {modality: {"tokens", "counts", "entropy", "top"}}}.

        counts[e] is how many (token, slot) pairs chose expert e, so they sum to
        tokens x top_k; entropy is that distribution's, in bits (log2(E) means
        perfectly even use); top lists the busiest experts as [expert, count]."""
        out: dict[int, dict[str, dict]] = {}
        for layer in self.layers:
            per_mod = {}
            for name, counts in self.counts.get(layer.index, {}).items():
                total = int(counts.sum())
                probs = [c / total for c in counts.tolist() if c] if total else []
                order = torch.argsort(counts, descending=True, stable=True)[:top].tolist()
                per_mod[name] = {
                    "tokens": self.tokens[layer.index][name],
                    "counts": counts.tolist(),
                    "entropy": -sum(p * math.log2(p) for p in probs),
                    "top": [[e, int(counts[e])] for e in order if counts[e] > 0],
                }
            out[layer.index] = per_mod
        return out

    def layer_info(self) -> dict[int, dict]:
        """What each summary key is: module path, decoder layer, experts, top-k."""
        return {layer.index: {"name": layer.name, "layer": layer.layer_idx, "num_experts": layer.num_experts,
                              "top_k": layer.top_k} for layer in self.layers}
