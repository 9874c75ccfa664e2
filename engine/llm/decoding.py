"""The token loop's small parts, shared by the local backends: sampling, incremental
detokenizing, and which token ids end an answer."""
from __future__ import annotations

from typing import Sequence

from engine.llm.base import GenParams, answer_seed


NUCLEUS_FIRST = 256  # candidates ranked before a full sort of the vocabulary (Sampler)


class Sampler:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling, seeded per answer
    by the seed and the prompt (base.answer_seed); the model's suppressed tokens never come out.

    OpenAI's extras, when the params ask: presence and frequency penalties on the tokens this
    answer has already sampled, a bias per token id, a grammar (structured.Grammar: only
    tokens it allows), and each chosen token's log-probability with its top alternatives
    (`chosen`: one (token, logprob, [(token, logprob), ...]) per token, in order)."""

    def __init__(self, params: GenParams, device, suppress: list[int] = (), prompt: Sequence[int] = (),
                 grammar=None) -> None:
        import torch

        self.t, self.top_p, self.suppress = params.temperature, params.top_p, list(suppress)
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.bias = dict(params.logit_bias)
        self.grammar, self.top_logprobs = grammar, params.logprobs
        self.counts: dict[int, int] = {}  # tokens sampled so far (the penalties')
        self.chosen: list[tuple] = []
        self.gen = None
        if self.t > 0:
            seed = answer_seed(params.seed, repr(list(prompt)).encode())
            self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits) -> int:
        logits = self._shaped(logits)
        token = self._draw(logits)
        if self.top_logprobs is not None:
            self._record(logits, token)
        if self.grammar is not None:
            self.grammar.accept(token)
        if self.presence or self.frequency:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _shaped(self, logits):
        """The logits with the suppressed tokens, the penalties, the bias and the grammar applied."""
        if not (self.suppress or self.counts or self.bias or self.grammar is not None):
            return logits
        logits = logits.float().clone()
        if self.suppress:  # the model's generation_config.suppress_tokens
            logits[..., self.suppress] = float("-inf")
        if self.counts:  # OpenAI's formula: presence once per token seen, frequency per occurrence
            ids = list(self.counts)
            seen = logits.new_tensor([self.counts[i] for i in ids])
            logits[..., ids] -= self.presence + self.frequency * seen
        for token, bias in self.bias.items():
            if token < logits.shape[-1]:
                logits[..., token] += bias
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        return logits

    def _draw(self, logits) -> int:
        import torch

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

    def _record(self, logits, token: int) -> None:
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)[0]
        top = logp.topk(self.top_logprobs) if self.top_logprobs else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        self.chosen.append((token, float(logp[token]), alternatives))


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


class TokenText:
    """An answer's tokens as TextDelta events: detokenized (Detokenizer), with the log-probabilities
    the sampler kept for them (OpenAI's entries) when they were asked for."""

    def __init__(self, tokenizer, sampler: Sampler) -> None:
        self.tok, self.sampler, self.detok = tokenizer, sampler, Detokenizer(tokenizer)
        self.pushed = self.done = 0  # tokens pushed; of them, whose entries went out

    def push(self, token: int):
        from engine.events import TextDelta

        self.pushed += 1
        text = self.detok.push(token)
        return TextDelta(text, self._entries()) if text else None

    def flush(self):
        from engine.events import TextDelta

        text, entries = self.detok.flush(), self._entries()
        return TextDelta(text, entries) if text or entries else None

    def _entries(self) -> tuple:
        if self.sampler.top_logprobs is None:
            return ()
        new, self.done = self.sampler.chosen[self.done:self.pushed], self.pushed  # (never the end token's)
        return tuple({**self._entry(token, lp), "top_logprobs": [self._entry(t, v) for t, v in top]}
                     for token, lp, top in new)

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tok.decode([token])
        return {"token": text, "logprob": round(logprob, 5), "bytes": list(text.encode("utf-8", "replace"))}


class StopText:
    """OpenAI's `stop` strings on a stream of text: `push(text)` returns what may be shown now,
    holding back the end that could be the start of a stop string; once one appears, the text
    before it and `hit` (the answer ends there, and the stop string is not shown)."""

    def __init__(self, stops) -> None:
        self.stops, self.held, self.hit = [s for s in stops if s], "", False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        self.held += text
        at = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            out, self.held, self.hit = self.held[:at], "", True
            return out
        hold = 0  # the longest end of the text that starts a stop string
        for stop in self.stops:
            hold = max([hold] + [n for n in range(1, min(len(stop), len(self.held) + 1))
                                 if self.held.endswith(stop[:n])])
        out, self.held = self.held[:len(self.held) - hold], self.held[len(self.held) - hold:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


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
