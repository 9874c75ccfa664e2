"""Structured output from the transformers backend: choices, JSON tool calls, grammars.

- `choose`: pick one of a few answers by the model's likelihood of each (the
  prompt runs once; each option is scored on the KV cache, then cropped off),
  so even a 135M model always gives one of the allowed answers.
- `json_call`: grammar-constrained decoding of a JSON object that satisfies
  a JSON schema (xgrammar compiles the schema into a token mask applied to
  the logits at every step), so the call always parses and validates.
- `Grammar`: the same mask for a sampled answer (OpenAI's `response_format`, decoding.Sampler)
  and for a function call's arguments (tool_calls.py).
"""
from __future__ import annotations

import json
from typing import Iterator, Sequence

from engine.errors import Unavailable
from engine.events import CancelToken


FINISH_MARGIN = 48  # tokens before the budget ends from which the call is steered to close


def choose(backend, messages: Sequence[dict], options: Sequence[str]) -> tuple[str, list[float]]:
    """(best option, log-probability of each option as the whole answer). The prompt runs once
    (`backend.steps`, on the fast path when the model has one); each option's tokens are
    scored one by one on its KV cache, then rewound."""
    import torch

    tok = backend.tokenizer
    end = sorted(backend.stop_ids)[:1]  # the answer ends after the option
    scores = []
    with torch.inference_mode():
        steps = backend.steps(backend.encode(messages))
        try:
            first, start = torch.log_softmax(steps.logits[0].float(), -1), steps.length
            for option in options:
                ids = tok(option, add_special_tokens=False).input_ids + end
                score = float(first[ids[0]])
                for prev, token in zip(ids, ids[1:]):
                    score += float(torch.log_softmax(steps.push(prev)[0].float(), -1)[token])
                steps.rewind(start)
                scores.append(score)
        finally:
            steps.close()
    best = max(range(len(options)), key=scores.__getitem__)
    return options[best], scores


def _compiler(backend):
    try:
        import xgrammar as xgr
    except ImportError as exc:
        raise Unavailable("constrained decoding needs xgrammar (make install adds it)") from exc
    if backend.grammar_compiler is None:
        import torch

        tokenizer = backend.tokenizer.hf() if backend.lean is not None else backend.tokenizer  # (xgrammar reads an HF one)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=backend.vocab_size)
        closing = torch.zeros(info.vocab_size)
        for i, piece in enumerate(info.decoded_vocab):
            if any(c in piece for c in (b'"', b"}", b"]")):
                closing[i] = 1e4
        backend.grammar_compiler = (xgr.GrammarCompiler(info, cache_enabled=True), info, closing)
    return backend.grammar_compiler


class Grammar:
    """A JSON value's grammar applied token by token (xgrammar): `mask(logits)` leaves only the
    tokens it allows (near the end of the budget, those that close strings and objects are
    pushed up), `accept(token)` moves it on, `done` once the value is whole; then only the
    model's end token is allowed. `schema` None: any JSON object (OpenAI's json_object)."""

    def __init__(self, backend, schema: dict | None, budget: int) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compile_schema(backend, schema))
        _, self.info, self.closing = backend.grammar_compiler
        self.bitmask = xgr.allocate_token_bitmask(1, self.info.vocab_size)
        self.left, self.end = budget, min(backend.stop_ids)

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()

    def mask(self, logits):
        import torch
        import xgrammar as xgr

        logits = logits.float().cpu()
        width = logits.shape[-1]
        if width < self.info.vocab_size:  # the grammar's vocabulary may be padded
            logits = torch.nn.functional.pad(logits, (0, self.info.vocab_size - width), value=-1e9)
        elif width > self.info.vocab_size:  # (the model's may be too)
            logits = logits[..., :self.info.vocab_size]
        if self.done:  # the value is whole: the answer ends
            out = torch.full_like(logits, float("-inf"))
            out[..., self.end] = 0.0
            return out
        if self.left < FINISH_MARGIN:  # running out: close strings and objects where allowed
            logits = logits + self.closing
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits

    def accept(self, token: int) -> None:
        if self.done:
            return
        if not self.matcher.accept_token(token):
            raise ValueError("the grammar refused its own token")
        self.left -= 1


def compile_schema(backend, schema: dict | None):
    """The compiled grammar of a JSON schema (None: any JSON object). ValueError saying what
    the grammar engine could not take (the API's 400)."""
    compiler = _compiler(backend)[0]
    schema = {"type": "object"} if schema is None else schema
    try:  # strict (no properties beyond those named) where it names them; a free-form object stays free
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                            strict_mode=bool(schema.get("properties")))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"the JSON schema cannot be compiled to a grammar: {str(exc).splitlines()[0][:300]}") from None


def json_call(backend, messages: Sequence[dict], schema: dict, cancel: CancelToken | None = None,
              max_new_tokens: int = 256) -> tuple[dict, int]:
    """A JSON object satisfying `schema`, decoded greedily under the schema's grammar.
    Returns (object, tokens generated). Raises ValueError if the budget ends first."""
    import torch

    grammar = Grammar(backend, schema, max_new_tokens)
    prompt = backend.encode(messages)
    with torch.inference_mode():
        steps = backend.steps(prompt)  # (the fast path's int8 steps when the model has one)
        try:
            out_ids = list(constrained(steps, grammar, max_new_tokens, cancel))
        finally:
            steps.close()
    text = backend.tokenizer.decode(out_ids, skip_special_tokens=True)
    if cancel is not None and cancel.cancelled:
        from generators.base import Cancelled

        raise Cancelled("cancelled")
    if not grammar.done:
        raise ValueError(f"the tool call did not finish within {max_new_tokens} tokens")
    return json.loads(text), len(out_ids)


def constrained(steps, grammar: Grammar, max_new_tokens: int, cancel) -> Iterator[int]:
    """Greedy tokens under the grammar, as they come, until it is done, the budget ends or a cancel."""
    for _ in range(max_new_tokens):
        if cancel is not None and cancel.cancelled:
            return
        token = int(grammar.mask(steps.logits).argmax(-1))
        grammar.accept(token)
        if grammar.done:
            return
        yield token
        steps.push(token)
