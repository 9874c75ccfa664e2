"""OpenAI-compatible HTTP API on the app's own server.

`POST /v1/chat/completions` (SSE streaming and plain JSON; inline base64 images and audio are
looked at by the perception adapters) and
`GET /v1/models`, plus `GET /v1/status` (the status panel as JSON). The
engine runs in a worker thread; when the client goes away the turn's
CancelToken is set and decoding stops within one token.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from app import chat_audio
from app.api_answers import Answer, collect, finish, held, merged, sse, usage_of
from app.api_params import chat_params, with_facts
from app.bodies import ChatMessage, ChatRequest, error, invalid
from engine.errors import InputError, Unavailable, refuse_lone_surrogates
from engine.events import CancelToken, Done, Error, Event, TextDelta, ToolCallDelta
from engine.engine import Engine
from engine.status import status

UNREADABLE_PART = {"video_url": "video", "file": "files"}
MEDIA_PARTS = ("image_url", "input_audio")  # inline base64 media, looked at / heard
CONTENT_PARTS = ("text", *MEDIA_PARTS, *UNREADABLE_PART)  # every chat content part type (tests/doors.py has a row each)


async def iterate_in_thread(make: Callable[[], Iterator[Event]], cancel: CancelToken) -> AsyncIterator[Event]:
    """Run a sync event iterator in a thread, yield its events here; cancel on exit.

    The worker always runs the iterator to its end (which comes within one
    step of the cancel), so locks taken inside it are released.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            cancel.cancel("server stopping")

    def work() -> None:
        try:
            for event in make():
                put(event)
        except Exception as exc:  # never lose the stream's end; the detail goes to the log, not the client
            logging.getLogger(__name__).exception("a turn failed")
            put(Error(f"internal error ({type(exc).__name__}); the server log has the detail", recoverable=False))
        finally:
            put(None)

    threading.Thread(target=work, name="api-turn", daemon=True).start()
    try:
        while (event := await queue.get()) is not None:
            yield event
    finally:
        cancel.cancel("client disconnected")


NOT_STARTED = (ValidationError, ValueError, TypeError, Unavailable)  # a request that cannot start


def not_started(exc: Exception) -> JSONResponse:
    """A bad field's 400 (pydantic's names each field), or the 503 of a role that is not there."""
    if isinstance(exc, ValidationError):
        return invalid(exc)
    if isinstance(exc, Unavailable):
        return error(503, f"{exc.why}; {exc.what_to_set}", "server_error")
    return error(400, str(exc))


def busy(engine: Engine) -> JSONResponse:
    """429 while the model's queue is full: say so now rather than keep the client for minutes."""
    return error(429, f"the assistant is busy: {engine.model_queue.waiting} requests are waiting for the model; "
                       "try again shortly", "rate_limit_error", headers={"retry-after": "10"})


async def read_json(request: Request) -> dict:
    """The body as a JSON object; ValueError (a 400) for anything else, nesting bombs included.
    Its size was bounded before a byte was read (app/security.Edge)."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None
    except ValueError as exc:  # (undecodable, malformed, a number of over 4300 digits)
        raise ValueError(f"the body is not valid JSON ({str(exc).split(';')[0][:200]})") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    refuse_lone_surrogates(raw, body)
    return body


AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "mp4", "webm", "aac", "mpeg")


def _data_part(kind: str, part: dict, i: int, n: int, max_bytes: int) -> tuple[str, bytes]:
    """(name to show, bytes) of an image_url / input_audio part sent inline (base64). The name is
    ours (`image-3`, `audio-1.wav`): nothing the client sends reaches a path."""
    import base64
    import binascii

    if kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise ValueError(f"messages[{i}]: image_url.url must be a string (a data: URL)")
        if not url.startswith("data:"):
            raise ValueError(f"messages[{i}]: send images inline as data: URLs (this app never fetches "
                             "from the network)")
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError(f"messages[{i}]: the image must be a base64 data: URL (data:image/png;base64,...)")
        name = f"image-{n}"
    else:
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise ValueError(f"messages[{i}]: input_audio must be an object with 'data' (base64) and 'format'")
        fmt = audio.get("format", "wav")
        if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
            raise ValueError(f"messages[{i}]: input_audio.format must be one of {', '.join(AUDIO_FORMATS)}")
        payload, name = audio["data"], f"audio-{n}.{fmt.lower()}"
    if len(payload) // 4 * 3 > max_bytes:
        raise ValueError(f"messages[{i}]: {name} is about {len(payload) * 0.75 / 1e6:.0f} MB; the limit is "
                         f"{max_bytes / 1e6:.0f} MB")
    try:
        return name, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"messages[{i}]: the {kind} part is not valid base64") from None


def _messages(raw: list[ChatMessage], max_bytes: int) -> tuple[list[dict], list[str], list[tuple[int, str, bytes]]]:
    """OpenAI messages -> engine messages (text), notes on parts that cannot be read,
    and the inline media to look at: (message index, name, bytes)."""
    out, notes, media = [], [], []
    for i, msg in enumerate(raw):
        content = msg.content or ""
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                kind = kind if isinstance(kind, str) else repr(type(kind).__name__)
                if kind not in CONTENT_PARTS:
                    raise ValueError(f"messages[{i}] has a content part of unsupported type {str(kind)[:40]!r}")
                if kind == "text":
                    if not isinstance(part.get("text", ""), str):
                        raise ValueError(f"messages[{i}]: a text part's 'text' must be a string")
                    texts.append(part.get("text", ""))
                elif kind in MEDIA_PARTS:
                    media.append((i, *_data_part(kind, part, i, len(media), max_bytes)))
                else:
                    notes.append(UNREADABLE_PART[kind])
            content = "\n".join(texts)
        message = {"role": "system" if msg.role == "developer" else msg.role, "content": content}
        if msg.tool_calls:  # an assistant's calls, and the results they got (read by the chat template)
            message["tool_calls"] = msg.tool_calls
        if msg.role == "tool":
            message["tool_call_id"] = msg.tool_call_id or ""
        out.append(message)
    return out, sorted(set(notes)), media


def _look(engine: Engine, messages: list[dict], media: list) -> list[str]:
    """Run the perception adapters on inline media; their facts join the message they came in.
    A file that cannot be read raises InputError (the request's 400, no server paths in it);
    returns notes for what was not looked at (perception turned off)."""
    import tempfile
    from pathlib import Path

    from engine.perception.base import public_message
    from engine.media import ingest
    from engine.perception.understand import with_facts

    notes = []
    with tempfile.TemporaryDirectory(prefix="omni-api-") as tmp:
        for n, (i, name, data) in enumerate(media):
            path = Path(tmp) / f"part-{n}"
            path.write_bytes(data)
            try:
                record = ingest(path, engine.media_dir, engine.config.max_upload_mb * 1_000_000, name)
                if not engine.perceiver.enabled:
                    notes.append(f"{name}: {engine.perceiver.status()[1]}")
                    continue
                facts = engine.perceiver.perceive(record).facts
            except InputError as exc:  # ingest and the perceiver name the file, never a server path
                text = public_message(str(exc), path, name)
                raise InputError(text if name in text else f"{name}: {text}") from None
            messages[i]["content"] = with_facts(messages[i]["content"], {name: facts})
    return notes


def make_router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")  # the token, when set, is checked in app/security.Edge

    def model_id() -> str:
        return engine.config.llm.model

    def model_card() -> dict:
        return {"id": model_id(), "object": "model", "created": 0, "owned_by": "local", "state": engine.llm_state()[0]}

    @router.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model:path}")
    def one_model(model: str):
        if model != model_id():
            return error(404, f"no model named {model[:80]!r}; this server runs {model_id()!r}",
                         param="model")
        return model_card()

    @router.get("/status")
    def get_status() -> dict:
        queue = engine.model_queue
        return {**status(engine), "queue": {"waiting": queue.waiting, "busy": queue.busy,
                                            "max_waiting": queue.max_waiting}}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = ChatRequest.model_validate(await read_json(request))
            messages, unreadable, media = _messages(body.messages, engine.config.max_upload_mb * 1_000_000)
            total = sum(len(m["content"] or "") for m in messages)
            if total > engine.config.max_prompt_chars:
                raise ValueError(f"the messages hold {total:,} characters; the limit is "
                                 f"{engine.config.max_prompt_chars:,}")
            if body.n > 1 and body.modalities and "audio" in body.modalities:
                raise ValueError("n: spoken answers (modalities audio) come one at a time; send n=1")
            params = await asyncio.to_thread(chat_params, engine, body)
            cancel = CancelToken()
            spoken = await asyncio.to_thread(chat_audio.requested, engine, body, cancel)  # modalities: audio
        except NOT_STARTED as exc:
            return not_started(exc)
        if engine.model_queue.full():
            return busy(engine)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        try:
            media, heard = await asyncio.to_thread(chat_audio.hear, engine, messages, media)  # input_audio
            unread = await asyncio.to_thread(_look, engine, messages, media) if media else []
        except InputError as exc:
            return error(400, f"messages: {exc}", param="messages")
        if heard or len(unread) < len(media):  # facts or a transcript joined a message: llm.facts_temperature
            params = with_facts(engine, params, body)
        prefix = (f"(I can't read {' or '.join(unreadable)} sent as links or files: send them inline "
                  "as base64 data.)\n\n") if unreadable else ""
        if unread:
            prefix += f"(I didn't look at {'; '.join(unread)}.)\n\n"
        streams = [choice_stream(engine, messages, replace(params, seed=params.seed + i)) for i in range(body.n)]

        def chunk(i: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> str:
            choice = {"index": i, "delta": delta, "finish_reason": finish_reason}
            if logprobs is not None:
                choice["logprobs"] = {"content": list(logprobs)}
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id(),
                        "choices": [choice]})

        if body.stream:
            source = await held(merged(streams), lambda item: item[1])
            if source is None:  # (the queue filled after the look above)
                return busy(engine)

            async def events() -> AsyncIterator[str]:
                answers = [Answer() for _ in streams]
                for i in range(len(streams)):
                    yield chunk(i, {"role": "assistant", "content": prefix})
                for delta in spoken.push(prefix) if spoken else ():
                    yield chunk(0, delta)
                async for i, ev in source:
                    answers[i].add(ev)
                    if isinstance(ev, TextDelta):
                        yield chunk(i, {"content": ev.text}, logprobs=ev.logprobs if body.logprobs else None)
                        for delta in spoken.push(ev.text) if spoken else ():
                            yield chunk(0, delta)
                    elif isinstance(ev, ToolCallDelta):
                        call = answers[i].calls[ev.index]
                        fn = {"name": ev.name, "arguments": ""} if ev.name else {"arguments": ev.arguments}
                        part = {"index": ev.index, "function": fn}
                        if ev.name:
                            part.update(id=call["id"], type="function")
                        yield chunk(i, {"tool_calls": [part]})
                    elif isinstance(ev, Error):
                        yield sse({"error": {"message": ev.message, "type": "server_error"}})
                    elif isinstance(ev, Done):
                        if spoken:  # the rest of the answer's audio, then the finish
                            async for delta in iterate_in_thread(spoken.rest, cancel):
                                yield chunk(0, delta) if isinstance(delta, dict) else ""
                        yield chunk(i, {}, finish(ev.usage))
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id(),
                               "choices": [], "usage": usage_of(answers)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        answers = list(await asyncio.gather(*(collect(s) for s in streams)))
        if any(a.busy for a in answers):  # the queue filled while it waited
            return busy(engine)
        if all(a.failed for a in answers):
            return error(503, " ".join(answers[0].errors), "server_error")
        choices = []
        for i, a in enumerate(answers):
            message = {"role": "assistant", "content": prefix + a.text if a.text or not a.calls else None}
            if a.calls:
                message["tool_calls"] = a.tool_calls()
            if spoken:
                message["audio"] = await asyncio.to_thread(spoken.whole, message["content"] or "")
            choice = {"index": i, "finish_reason": finish(a.usage), "message": message}
            if body.logprobs:
                choice["logprobs"] = {"content": a.logprobs}
            choices.append(choice)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id(),
                "choices": choices, "usage": usage_of(answers), "notices": [n for a in answers for n in a.notices]}

    return router


def choice_stream(engine: Engine, messages, params) -> AsyncIterator[Event]:
    """One sampled answer's events, from a worker thread; its own cancel (a stop string ends
    this choice alone), set when the client goes."""
    cancel = CancelToken()
    return iterate_in_thread(lambda: engine.complete(messages, params, cancel), cancel)
