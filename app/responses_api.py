"""`/v1/responses`: OpenAI's Responses API, the one their newer SDKs and agent tools speak.

`input` (text, or items: messages with input_text / input_image parts, function_call and
function_call_output), `instructions`, function `tools` with `tool_choice`, `text.format`
(json_object, json_schema), `max_output_tokens`, `temperature`, `top_p`, streamed with
the Responses event set (response.created, response.output_text.delta,
response.function_call_arguments.delta, response.completed, ...). Stateful beyond a
stateless server: with `store` (the default) the response is kept in the conversation
store (engine/store.py), `previous_response_id` continues from it, and
`GET`/`DELETE /v1/responses/{id}` read and remove it. The answer itself is a chat
completion (app/api.py): the same params, perception and model.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator

from app.api import NOT_STARTED, _look, _messages, busy, choice_stream, not_started, read_json
from app.api_answers import Answer, held
from app.api_params import chat_params
from app.bodies import Body, ChatRequest, error, refused
from engine.engine import Engine
from engine.errors import InputError
from engine.events import Done, Error, TextDelta, ToolCallDelta


class ResponsesRequest(Body):
    model: str = ""
    input: str | list[dict]
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict | None = None
    parallel_tool_calls: bool = True
    text: dict | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict | None = None

    _refused = model_validator(mode="before")(classmethod(lambda cls, body: refused(body)))

    def chat(self, history: list[dict]) -> ChatRequest:
        """The same request as a chat completion (its fields checked there, named in its terms)."""
        tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                 for t in self.tools or () if isinstance(t, dict)]
        if len(tools) < len(self.tools or ()) or any(t.get("type") != "function" for t in self.tools or ()):
            raise ValueError("tools: only function tools are supported ({'type': 'function', 'name', 'parameters'})")
        choice = self.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name", "")}}
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return ChatRequest.model_validate({
            "messages": system + history + items(self.input), "tools": tools or None, "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls, "response_format": fmt,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p})


ITEM_TYPES = ("message", "function_call", "function_call_output")  # input items read (tests/doors.py has a row each)
TEXT_PARTS = ("input_text", "output_text", "text")
PART_TYPES = (*TEXT_PARTS, "input_image")  # a message item's content parts
ROLES = ("user", "assistant", "system", "developer")


def items(value) -> list[dict]:
    """Responses input items as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"input[{i}]: an item must be an object")
        kind = item.get("type", "message")
        if kind not in ITEM_TYPES:
            raise ValueError(f"input[{i}]: items of type {str(kind)[:40]!r} are not supported")
        if kind == "message":
            role, content = item.get("role", "user"), item.get("content")
            if role not in ROLES:  # (said here in the request's own terms, not the chat request's)
                raise ValueError(f"input[{i}].role must be one of {', '.join(ROLES)}")
            if isinstance(content, list):
                content = [part(p, i) for p in content]
            elif not isinstance(content, str):
                raise ValueError(f"input[{i}].content must be a string or a list of content parts")
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                        "content": output if isinstance(output, str) else json.dumps(output)})
    return out


def part(p, i: int) -> dict:
    kind = p.get("type") if isinstance(p, dict) else None
    if kind not in PART_TYPES:
        raise ValueError(f"input[{i}]: content parts of type {str(kind)[:40]!r} are not supported")
    if kind in TEXT_PARTS:
        return {"type": "text", "text": p.get("text", "")}
    return {"type": "image_url", "image_url": {"url": p.get("image_url", "")}}  # input_image


def output_items(answer: Answer, ids: dict) -> list[dict]:
    out = []
    if answer.text or not answer.calls:
        out.append({"type": "message", "id": ids["message"], "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": answer.text, "annotations": []}]})
    for index, call in sorted(answer.calls.items()):
        out.append({"type": "function_call", "id": f"fc_{call['id'][5:]}", "call_id": call["id"],
                    "name": call["name"], "arguments": call["arguments"], "status": "completed"})
    return out


def make_router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")
    store = engine.store

    @router.post("/responses")
    async def responses(request: Request):
        try:
            raw = await read_json(request)
            body = ResponsesRequest.model_validate(raw)
            history: list[dict] = []
            if body.previous_response_id:
                history = store.response_messages(body.previous_response_id)
                if history is None:
                    return error(404, f"no stored response {body.previous_response_id[:64]!r}",
                                 param="previous_response_id")
            chat = body.chat(history)
            messages, unreadable, media = _messages(chat.messages, engine.config.max_upload_mb * 1_000_000)
            if unreadable:
                raise ValueError("input: send files inline as base64 data")
            params = await asyncio.to_thread(chat_params, engine, chat)
        except NOT_STARTED as exc:
            return not_started(exc)
        if engine.model_queue.full():
            return busy(engine)
        try:
            if media:
                await asyncio.to_thread(_look, engine, messages, media)
        except InputError as exc:
            return error(400, f"input: {exc}", param="input")
        rid = f"resp_{uuid.uuid4().hex[:24]}"
        ids = {"message": f"msg_{uuid.uuid4().hex[:24]}"}
        shell = {"id": rid, "object": "response", "created_at": int(time.time()), "model": engine.config.llm.model,
                 "status": "in_progress", "output": [], "error": None, "incomplete_details": None,
                 "instructions": body.instructions, "metadata": body.metadata or {},
                 "parallel_tool_calls": body.parallel_tool_calls, "temperature": params.temperature,
                 "top_p": params.top_p, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
                 "text": body.text or {"format": {"type": "text"}}, "max_output_tokens": body.max_output_tokens,
                 "previous_response_id": body.previous_response_id, "store": body.store, "usage": None}
        stream = choice_stream(engine, messages, params)

        def finished(answer: Answer) -> dict:
            usage = answer.usage
            p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            length = usage.get("finish_reason") == "length"
            done = {**shell, "status": "incomplete" if length else "completed",
                    "incomplete_details": {"reason": "max_output_tokens"} if length else None,
                    "output": output_items(answer, ids),
                    "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c,
                              "input_tokens_details": {"cached_tokens": usage.get("cached_prompt_tokens", 0)},
                              "output_tokens_details": {"reasoning_tokens": 0}}}
            if answer.failed:
                done.update(status="failed", error={"code": "server_error", "message": " ".join(answer.errors)})
            if body.store and not answer.failed:
                said = items(body.input) + [m for m in _said(answer)]
                store.save_response(rid, body.previous_response_id, said, done)
            return done

        if body.stream:
            stream = await held(stream)
            if stream is None:  # (the queue filled after the look above)
                return busy(engine)
            return StreamingResponse(_events(stream, shell, ids, finished), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = Answer()
        async for ev in stream:
            answer.add(ev)
        if answer.busy:
            return busy(engine)
        return finished(answer)

    @router.get("/responses/{rid}")
    def get_response(rid: str):
        found = store.get_response(rid)
        return found if found is not None else error(404, f"no stored response {rid[:64]!r}")

    @router.delete("/responses/{rid}")
    def delete_response(rid: str):
        if not store.delete_response(rid):
            return error(404, f"no stored response {rid[:64]!r}")
        return {"id": rid, "object": "response", "deleted": True}

    return router


def _said(answer: Answer) -> list[dict]:
    """The answer as the messages a later response reads."""
    message = {"role": "assistant", "content": answer.text or None}
    if answer.calls:
        message["tool_calls"] = answer.tool_calls()
    return [message]


async def _events(stream, shell: dict, ids: dict, finished) -> AsyncIterator[str]:
    """The Responses stream: created, then each output item's parts and deltas, then completed."""
    seq = iter(range(1 << 30))

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n"

    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    answer, text_open, index = Answer(), False, 0
    item_of: dict[int, int] = {}  # call index -> output index
    message = {"type": "message", "id": ids["message"], "status": "in_progress", "role": "assistant", "content": []}
    async for ev in stream:
        answer.add(ev)
        if isinstance(ev, TextDelta) and ev.text:
            if not text_open:
                text_open = True
                yield event("response.output_item.added", output_index=index, item=message)
                yield event("response.content_part.added", item_id=ids["message"], output_index=index,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []})
            yield event("response.output_text.delta", item_id=ids["message"], output_index=index,
                        content_index=0, delta=ev.text, logprobs=[])
        elif isinstance(ev, ToolCallDelta):
            call = answer.calls[ev.index]
            fid = f"fc_{call['id'][5:]}"
            if ev.name:
                item_of[ev.index] = index + text_open + ev.index
                yield event("response.output_item.added", output_index=item_of[ev.index],
                            item={"type": "function_call", "id": fid, "call_id": call["id"], "name": ev.name,
                                  "arguments": "", "status": "in_progress"})
            elif ev.arguments:
                yield event("response.function_call_arguments.delta", item_id=fid, output_index=item_of[ev.index],
                            delta=ev.arguments)
        elif isinstance(ev, Error):
            yield event("error", code="server_error", message=ev.message, param=None)
        elif isinstance(ev, Done):
            pass
    done = finished(answer)
    items_out = done["output"]
    if text_open:
        yield event("response.output_text.done", item_id=ids["message"], output_index=index, content_index=0,
                    text=answer.text, logprobs=[])
        yield event("response.content_part.done", item_id=ids["message"], output_index=index, content_index=0,
                    part=items_out[0]["content"][0])
        yield event("response.output_item.done", output_index=index, item=items_out[0])
    for call_index, out_index in sorted(item_of.items()):
        item = next(i for i in items_out if i["type"] == "function_call" and i["call_id"] == answer.calls[call_index]["id"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=out_index,
                    arguments=item["arguments"], name=item["name"])
        yield event("response.output_item.done", output_index=out_index, item=item)
    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(done["status"], "response.failed")
    yield event(kind, response=done)
