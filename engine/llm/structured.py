"""Structured output from the transformers backend: choices and JSON tool calls.

- `choose`: pick one of a few answers by the model's likelihood of each (the
  prompt runs once; each option is scored on the KV cache, then cropped off),
  so even a 135M model always gives one of the allowed answers.
- `json_call`: grammar-constrained decoding of a JSON object that satisfies
  a JSON schema (xgrammar compiles the schema into a token mask applied to
  the logits at every step), so the call always parses and validates.
"""
from __future__ import annotations

import json
from typing import Sequence

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


def json_call(backend, messages: Sequence[dict], schema: dict, cancel: CancelToken | None = None,
              max_new_tokens: int = 256) -> tuple[dict, int]:
    """A JSON object satisfying `schema`, decoded greedily under the schema's grammar.
    Returns (object, tokens generated). Raises ValueError if the budget ends first."""
    import torch
    import xgrammar as xgr

    compiler, info, closing = _compiler(backend)
    grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    matcher = xgr.GrammarMatcher(grammar)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    prompt = backend.encode(messages)
    with torch.inference_mode():
        steps = backend.steps(prompt)  # (the fast path's int8 steps when the model has one)
        try:
            out_ids = _constrained(steps, matcher, mask, info, closing, max_new_tokens, cancel)
        finally:
            steps.close()
    text = backend.tokenizer.decode(out_ids, skip_special_tokens=True)
    if cancel is not None and cancel.cancelled:
        from generators.base import Cancelled

        raise Cancelled("cancelled")
    if not matcher.is_terminated():
        raise ValueError(f"the tool call did not finish within {max_new_tokens} tokens")
    return json.loads(text), len(out_ids)


def _constrained(steps, matcher, mask, info, closing, max_new_tokens: int, cancel) -> list[int]:
    """Greedy tokens under the grammar's mask until it terminates, the budget ends or a cancel."""
    import torch
    import xgrammar as xgr

    out_ids: list[int] = []
    for step in range(max_new_tokens):
        if cancel is not None and cancel.cancelled:
            break
        logits = steps.logits.float().cpu()
        if logits.shape[-1] < info.vocab_size:  # the grammar's vocabulary may be padded
            logits = torch.nn.functional.pad(logits, (0, info.vocab_size - logits.shape[-1]), value=-1e9)
        if max_new_tokens - step < FINISH_MARGIN:  # running out: close strings and objects where allowed
            logits = logits + closing
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        token = int(logits.argmax(-1))
        if not matcher.accept_token(token):
            raise ValueError("the grammar refused its own token")
        if matcher.is_terminated():
            break
        out_ids.append(token)
        steps.push(token)
    return out_ids
