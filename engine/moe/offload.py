"""Expert offload: every expert in (pinned) CPU memory, hot ones on the fast device.

`offload_experts` keeps the non-expert weights (attention, norms, routers,
shared experts, embeddings) on the fast device and swaps each MoE block's
forward for one that routes with the block's own router, fetches the chosen
experts through an `ExpertCache` (LRU within a byte budget that is never
exceeded: room is made before a load) and combines them exactly like the
original forward. With prefetch, layer L's input is also sent through layer
L+1's router (a cheap lookahead: one small matmul) and the experts it picks
are loaded ahead of time, on a side CUDA stream when the fast device is CUDA,
synchronously elsewhere. Inference only: cached copies carry no gradients.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from engine.moe.families import MoELayer, find_moe_layers

Key = tuple[int, int]  # (MoE layer index, expert)


@dataclass
class _Entry:
    tensors: dict[str, torch.Tensor]
    size: int
    prefetched: bool = False  # loaded by prefetch and not used yet
    event: object = None  # CUDA event the side-stream copy records


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    prefetch_loads: int = 0  # experts loaded ahead by prefetch
    prefetch_useful: int = 0  # of those, used before being evicted
    prefetch_guessed: int = 0  # experts guessed for the next layer
    prefetch_correct: int = 0  # of those, routed to by that layer
    peak_bytes: int = 0


class ExpertCache:
    """An LRU of experts resident on `device`, within `budget_bytes`.

    `sources[key]` are the CPU tensors (views of the model's own, pinned on
    CUDA); a resident entry is a private copy on `device`. `on_load` callables
    run after every load (tests check the budget there)."""

    def __init__(self, layers: list[MoELayer], device, budget_bytes: int) -> None:
        self.layers = layers
        self.device = torch.device(device)
        self.budget = int(budget_bytes)
        self.sources: dict[Key, dict[str, torch.Tensor]] = {}
        self.sizes: dict[Key, int] = {}
        for layer in layers:
            for e in range(layer.num_experts):
                tensors = layer.expert_tensors(e)
                self.sources[(layer.index, e)] = tensors
                self.sizes[(layer.index, e)] = sum(t.numel() * t.element_size() for t in tensors.values())
        self.min_bytes = max(self.sizes.values())
        check_budget(self.budget, self.min_bytes)
        self.resident: OrderedDict[Key, _Entry] = OrderedDict()
        self.used = 0
        self.on_load: list = []
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._guess: dict[int, set[int]] = {}
        self.s = CacheStats()

    # -- lookups -------------------------------------------------------------
    def get(self, key: Key, protect: set[Key] = frozenset()) -> dict[str, torch.Tensor]:
        """Expert `key` on the device: a hit moves it to most-recent, a miss loads it
        (evicting least-recent entries, those in `protect` last)."""
        entry = self.resident.get(key)
        if entry is not None:
            self.s.hits += 1
            self.resident.move_to_end(key)
            if entry.prefetched:
                self.s.prefetch_useful += 1
                entry.prefetched = False
        else:
            self.s.misses += 1
            entry = self._load(key, protect) or self._load(key, frozenset())
        if entry.event is not None:  # finish the side-stream copy before use
            main = torch.cuda.current_stream(self.device)
            main.wait_event(entry.event)
            for t in entry.tensors.values():
                t.record_stream(main)
            entry.event = None
        return entry.tensors

    def prefetch(self, layer: MoELayer, h: torch.Tensor, protect: set[Key]) -> None:
        """Guess `layer`'s experts for h through its router and load them ahead,
        most-wanted first, without evicting `protect` nor the room it still needs."""
        _, indices, _ = layer.route(h, hooks=False)
        counts = torch.bincount(indices.flatten(), minlength=layer.num_experts)
        order = [e for e in torch.argsort(counts, descending=True, stable=True).tolist() if counts[e] > 0]
        self._guess[layer.index] = set(order)
        keep = set(protect)
        reserve = sum(self.sizes[k] for k in protect if k not in self.resident)
        for e in order:
            key = (layer.index, e)
            keep.add(key)
            if key in self.resident:
                self.resident.move_to_end(key)
                continue
            entry = self._load(key, keep, reserve, prefetch=True)
            if entry is None:
                break
            self.s.prefetch_loads += 1

    def note_routing(self, layer: MoELayer, experts: list[int]) -> None:
        """Score the guess made for this layer against where its tokens went."""
        guess = self._guess.pop(layer.index, None)
        if guess is not None:
            self.s.prefetch_guessed += len(guess)
            self.s.prefetch_correct += len(guess & set(experts))

    # -- loading and eviction -------------------------------------------------
    def _load(self, key: Key, protect, reserve: int = 0, prefetch: bool = False) -> _Entry | None:
        size = self.sizes[key]
        if not self._make_room(size + reserve, protect):
            return None
        side = self.stream if prefetch else None
        non_blocking = self.device.type == "cuda"  # sources are pinned; copies are stream-ordered
        with torch.cuda.stream(side) if side is not None else nullcontext():
            tensors = {n: torch.empty_like(t, device=self.device).copy_(t, non_blocking=non_blocking)
                       for n, t in self.sources[key].items()}
            event = None
            if side is not None:
                event = torch.cuda.Event()
                event.record(side)
        entry = _Entry(tensors, size, prefetched=prefetch, event=event)
        self.resident[key] = entry
        self.used += size
        self.s.bytes_moved += size
        self.s.peak_bytes = max(self.s.peak_bytes, self.used)
        assert self.used <= self.budget, (self.used, self.budget)
        for callback in self.on_load:
            callback(self)
        return entry

    def _make_room(self, size: int, protect) -> bool:
        """Evict least-recent entries outside `protect` until `size` more bytes fit."""
        if size > self.budget:
            return False
        while self.used + size > self.budget:
            victim = next((k for k in self.resident if k not in protect), None)
            if victim is None:
                return False
            entry = self.resident.pop(victim)
            self.used -= entry.size
            self.s.evictions += 1
        return True

    def clear(self) -> None:
        self.resident.clear()
        self.used = 0

    def reset_stats(self) -> None:
        self.s = CacheStats(peak_bytes=self.used)

    def stats(self) -> dict:
        s = self.s
        lookups = s.hits + s.misses
        return {
            "hits": s.hits, "misses": s.misses, "evictions": s.evictions, "bytes_moved": s.bytes_moved,
            "hit_rate": s.hits / lookups if lookups else 0.0,
            "resident_bytes": self.used, "peak_bytes": s.peak_bytes, "budget_bytes": self.budget,
            "resident_experts": len(self.resident),
            "prefetch_loads": s.prefetch_loads, "prefetch_useful": s.prefetch_useful,
            "prefetch_guessed": s.prefetch_guessed, "prefetch_correct": s.prefetch_correct,
            "prefetch_accuracy": s.prefetch_correct / s.prefetch_guessed if s.prefetch_guessed else None,
        }


def check_budget(budget_bytes: int, min_bytes: int) -> None:
    if budget_bytes < min_bytes:
        raise ValueError(f"expert budget of {budget_bytes} bytes is smaller than one expert: the minimum is "
                         f"{min_bytes} bytes ({min_bytes / 2**20:.2f} MiB)")


def min_budget_bytes(layers: list[MoELayer]) -> int:
    """The smallest budget offload accepts: the largest single expert."""
    return max(layer.expert_bytes(e) for layer in layers for e in range(layer.num_experts))


def _offloaded_forward(layer: MoELayer, cache: ExpertCache, prefetch: bool):
    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        weights, indices, logits = layer.route(h)
        experts = torch.unique(indices).tolist()
        needed = {(layer.index, e) for e in experts}
        cache.note_routing(layer, experts)
        if prefetch and layer.next is not None:
            cache.prefetch(layer.next, h, protect=needed)
        # experts run in ascending order: keep the ones still to run from being evicted
        out = layer.combine(h, weights, indices, lambda e: cache.get(
            (layer.index, e), {k for k in needed if k[1] > e})).reshape(shape)
        return (out, logits) if layer.legacy_router else out

    return forward


def offload_experts(model: nn.Module, fast_device, budget_bytes: int, prefetch: bool = True) -> ExpertCache:
    """Offload every expert of `model` to CPU behind an ExpertCache on `fast_device`.

    Raises ValueError (naming the minimum) when the budget cannot hold the
    largest single expert. Returns the cache; `restore_forwards(cache)` puts the
    original block forwards back (the experts stay in CPU memory)."""
    fast = torch.device(fast_device)
    layers = find_moe_layers(model)
    check_budget(int(budget_bytes), min_budget_bytes(layers))
    if any("forward" in layer.block.__dict__ for layer in layers):
        raise ValueError("this model's experts are already offloaded; call restore_forwards(cache) first")
    pin = fast.type == "cuda" and torch.cuda.is_available()
    detached = [(layer.block, layer.block._modules.pop("experts")) for layer in layers]
    try:
        for _, experts in detached:
            experts.to("cpu")
            if pin:
                for p in experts.parameters():
                    p.data = p.data.pin_memory()
        model.to(fast)
    finally:
        for block, experts in detached:
            block._modules["experts"] = experts
    cache = ExpertCache(layers, fast, budget_bytes)
    for layer in layers:
        layer.block.forward = _offloaded_forward(layer, cache, prefetch)
    return cache


def restore_forwards(cache: ExpertCache) -> None:
    """Undo the forward swap; the blocks then run their experts from CPU memory."""
    for layer in cache.layers:
        layer.block.__dict__.pop("forward", None)
    cache.clear()
