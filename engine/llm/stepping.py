"""A prompt's KV cache stepped by hand (constrained decoding, choices, tool calls): on the fast
path a driven sequence of the scheduler's batch (engine/llm/scheduler.py), else transformers'
forward with its own cache."""
from __future__ import annotations


class Steps:
    """A prompt's KV cache stepped one token at a time: `push` appends, `rewind` drops back,
    `close` when done. On the fast path, a driven sequence of the scheduler's batch."""

    def __init__(self, backend, prompt: list[int]) -> None:
        self.backend, self.cache, self.length = backend, None, len(prompt)
        self.seq = backend.scheduler.open(prompt) if backend.scheduler is not None else None
        if self.seq is not None:
            self.logits = self.seq.logits()
        else:
            self.logits = self._forward(prompt, logits_to_keep=1)

    def rewind(self, length: int) -> None:
        """Forget the positions from `length` on (the logits are those of the last push)."""
        if self.seq is not None:
            self.seq.rewind(length)
        else:
            crop(self.cache, length)
        self.length = min(self.length, length)

    def close(self) -> None:
        if self.seq is not None:
            self.seq.close()

    def _forward(self, ids, **kwargs):
        import torch

        b = self.backend
        out = b.model(input_ids=torch.tensor([ids], device=b.device), cache=self.cache, use_cache=True, **kwargs)
        self.cache = out.cache
        return out.logits[:, -1, :]

    def push(self, token: int):
        if self.seq is not None:
            self.seq.push(token)
            self.logits = self.seq.logits()
        else:
            self.logits = self._forward([token])
        self.length += 1
        return self.logits


def crop(cache, length: int) -> None:
    """Keep the first `length` positions of a transformers KV cache."""
    if cache.get_seq_length() > length:
        cache.crop(length - cache.get_seq_length())  # (this API takes how many to drop)
