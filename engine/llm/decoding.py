"""The token loop's small parts, shared by the local backends: sampling, incremental
detokenizing, and which token ids end an answer."""
from __future__ import annotations

from typing import Sequence

from engine.llm.base import GenParams, answer_seed


NUCLEUS_FIRST = 256  # candidates ranked before a full sort of the vocabulary (Sampler)


class Sampler:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling, seeded per answer
    by the seed and the prompt (base.answer_seed); the model's suppressed tokens never come out."""

    def __init__(self, params: GenParams, device, suppress: list[int] = (), prompt: Sequence[int] = ()) -> None:
        import torch

        self.t, self.top_p, self.suppress = params.temperature, params.top_p, list(suppress)
        self.gen = None
        if self.t > 0:
            seed = answer_seed(params.seed, repr(list(prompt)).encode())
            self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits) -> int:
        import torch

        if self.suppress:  # the model's generation_config.suppress_tokens
            logits = logits.clone()
            logits[..., self.suppress] = float("-inf")
        if self.gen is None:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits.float() / self.t, dim=-1)[0]
        if self.top_p >= 1.0:
            return int(torch.multinomial(probs, 1, generator=self.gen))
        # the nucleus: the most likely tokens until their mass reaches top_p. It nearly always
        # lies in the top few hundred, so those are ranked first (sorting Qwen's 151,936-token
        # vocabulary cost more per token than a decode step); the whole sort only when not.
        top, order = probs.topk(min(NUCLEUS_FIRST, probs.numel()))
        if float(top.sum()) < self.top_p and top.numel() < probs.numel():
            top, order = probs.sort(descending=True)
        keep = top.cumsum(0) - top < self.top_p
        return int(order[keep][torch.multinomial(top[keep], 1, generator=self.gen)])


class Detokenizer:
    """Incremental decoding that never splits a multi-byte character or a
    word-initial space (the prefix/read offsets used by TGI and vLLM)."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids
