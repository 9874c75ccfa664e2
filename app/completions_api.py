"""`POST /v1/completions`: OpenAI's text completion, a prompt continued without the chat template.

`suffix` asks for the middle between the prompt and the suffix, written with the model's own
fill-in-the-middle tokens (Qwen2.5-Coder has them), as editor completion clients send it;
`echo` puts the prompt before the answer; `logprobs` (0-5) gives the legacy shape (tokens,
token_logprobs, top_logprobs, text_offset). `stop`, `n`, `seed`, penalties, `logit_bias` and
`stream` as in chat.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api import NOT_STARTED, busy, choice_stream, not_started, read_json
from app.api_answers import Answer, collect, finish, held, merged, sse, usage_of
from app.api_params import check, sampling
from app.bodies import CompletionRequest, error
from engine.engine import Engine
from engine.events import Done, Error, TextDelta

FIM = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def make_router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/completions")
    async def completions(request: Request):
        try:
            body = CompletionRequest.model_validate(await read_json(request))
            if not body.prompt and not body.suffix:
                raise ValueError("prompt: give some text to complete")
            if len(body.prompt) + len(body.suffix or "") > engine.config.max_prompt_chars:
                raise ValueError(f"prompt: the limit is {engine.config.max_prompt_chars:,} characters")
            if body.suffix is not None and body.echo:
                raise ValueError("echo: not with suffix (the answer is the middle)")
            params = sampling(engine, body, body.max_tokens, body.logprobs)
            prompt = FIM.format(prefix=body.prompt, suffix=body.suffix) if body.suffix is not None else body.prompt
            await asyncio.to_thread(_fits, engine, body, prompt, params)
        except NOT_STARTED as exc:
            return not_started(exc)
        if engine.model_queue.full():
            return busy(engine)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        streams = [choice_stream(engine, prompt, replace(params, seed=params.seed + i)) for i in range(body.n)]
        echo = body.prompt if body.echo else ""

        def obj(choices: list, usage: dict | None = None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created,
                   "model": engine.config.llm.model, "choices": choices}
            return {**out, "usage": usage} if usage is not None else out

        def choice(i: int, text: str, entries, finish_reason: str | None, offset: int = 0) -> dict:
            logprobs = legacy(entries, offset) if body.logprobs is not None else None
            return {"text": text, "index": i, "logprobs": logprobs, "finish_reason": finish_reason}

        if body.stream:
            source = await held(merged(streams), lambda item: item[1])
            if source is None:  # (the queue filled after the look above)
                return busy(engine)

            async def events() -> AsyncIterator[str]:
                offsets = [len(echo)] * len(streams)
                if echo:
                    for i in range(len(streams)):
                        yield sse(obj([choice(i, echo, (), None)]))
                answers = [Answer() for _ in streams]
                async for i, ev in source:
                    answers[i].add(ev)
                    if isinstance(ev, TextDelta):
                        yield sse(obj([choice(i, ev.text, ev.logprobs, None, offsets[i])]))
                        offsets[i] += len(ev.text)
                    elif isinstance(ev, Error):
                        yield sse({"error": {"message": ev.message, "type": "server_error"}})
                    elif isinstance(ev, Done):
                        yield sse(obj([choice(i, "", (), finish(ev.usage))]))
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield sse(obj([], usage_of(answers)))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        answers = list(await asyncio.gather(*(collect(s) for s in streams)))
        if any(a.busy for a in answers):
            return busy(engine)
        if all(a.failed for a in answers):
            return error(503, " ".join(answers[0].errors), "server_error")
        return obj([choice(i, echo + a.text, a.logprobs, finish(a.usage), len(echo)) for i, a in enumerate(answers)],
                   usage_of(answers))

    return router


def _fits(engine: Engine, body: CompletionRequest, prompt: str, params) -> None:
    """The model takes raw prompts (and fill-in-the-middle when asked), and this one fits."""
    asked = ["prompt"] + (["suffix"] if body.suffix is not None else []) + \
        (["logprobs"] if body.logprobs is not None else []) + \
        [name for name in ("presence_penalty", "frequency_penalty", "logit_bias") if getattr(body, name)]
    llm = check(engine, asked)
    n = llm.count_tokens(prompt)
    if n + 1 > llm.context_tokens:
        raise ValueError(f"prompt: {n:,} tokens; the model's context holds {llm.context_tokens:,}")


def legacy(entries, offset: int) -> dict:
    """Log-probabilities in the completions API's older shape."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        logprobs.append(entry["logprob"])
        tops.append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
