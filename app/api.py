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
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.events import CancelToken, Done, Error, Event, Notice, TextDelta
from engine.engine import Engine
from engine.status import status

UNREADABLE_PART = {"video_url": "video", "file": "files"}


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
        except Exception as exc:  # never lose the stream's end
            put(Error(f"internal error: {exc}", recoverable=False))
        finally:
            put(None)

    threading.Thread(target=work, name="api-turn", daemon=True).start()
    try:
        while (event := await queue.get()) is not None:
            yield event
    finally:
        cancel.cancel("client disconnected")


def _error(status_code: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status_code}}, status_code=status_code)


def _data_part(kind: str, part: dict, i: int) -> tuple[str, bytes]:
    """(file name, bytes) of an image_url / input_audio part sent inline (base64)."""
    import base64
    import binascii

    try:
        if kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
                else str(part.get("image_url") or "")
            if not url.startswith("data:"):
                raise ValueError(f"messages[{i}]: send images inline as data: URLs (this app never fetches "
                                 "from the network)")
            return f"image-{i}", base64.b64decode(url.split(",", 1)[1], validate=True)
        audio = part.get("input_audio") or {}
        return f"audio-{i}.{audio.get('format', 'wav')}", base64.b64decode(audio.get("data", ""), validate=True)
    except (binascii.Error, IndexError):
        raise ValueError(f"messages[{i}]: the {kind} part is not valid base64") from None


def _messages(body: dict) -> tuple[list[dict], list[str], list[tuple[int, str, bytes]]]:
    """OpenAI messages -> engine messages (text), notes on parts that cannot be read,
    and the inline media to look at: (message index, file name, bytes)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    out, notes, media = [], [], []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}] needs a role of system, user or assistant")
        content = msg.get("content") or ""
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind in ("image_url", "input_audio"):
                    media.append((i, *_data_part(kind, part, i)))
                elif kind in UNREADABLE_PART:
                    notes.append(UNREADABLE_PART[kind])
                else:
                    raise ValueError(f"messages[{i}] has a content part of unsupported type {kind!r}")
            content = "\n".join(texts)
        role = {"developer": "system", "tool": "user"}.get(msg["role"], msg["role"])
        out.append({"role": role, "content": str(content)})
    return out, sorted(set(notes)), media


def _look(engine: Engine, messages: list[dict], media: list) -> list[str]:
    """Run the perception adapters on inline media; their facts join the message they came in.
    Returns notes for what could not be read."""
    import tempfile
    from pathlib import Path

    from engine.errors import InputError
    from engine.media import ingest
    from engine.understand import with_facts

    notes = []
    with tempfile.TemporaryDirectory(prefix="omni-api-") as tmp:
        for i, name, data in media:
            path = Path(tmp) / name
            path.write_bytes(data)
            try:
                record = ingest(path, engine.media_dir, engine.config.max_upload_mb * 1_000_000)
                if not engine.perceiver.enabled:
                    raise InputError(engine.perceiver.status()[1])
                facts = engine.perceiver.perceive(record).facts
            except InputError as exc:
                notes.append(str(exc) if name in str(exc) else f"{name}: {exc}")
                continue
            messages[i]["content"] = with_facts(messages[i]["content"], {name: facts})
    return notes


def bearer(engine: Engine) -> Callable[[Request], None]:
    """The dependency every /v1 route has: the bearer token, when one is configured."""
    def check_token(request: Request) -> None:
        token = engine.config.auth_token
        if token and request.headers.get("authorization", "") != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    return check_token


def make_router(engine: Engine) -> APIRouter:
    check_token = bearer(engine)
    router = APIRouter(prefix="/v1", dependencies=[Depends(check_token)])

    def model_id() -> str:
        return engine.config.llm.model

    @router.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [
            {"id": model_id(), "object": "model", "created": 0, "owned_by": "local",
             "state": engine.llm_state()[0]}]}

    @router.get("/status")
    def get_status() -> dict:
        return status(engine)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            messages, unreadable, media = _messages(body)
            total = sum(len(m["content"]) for m in messages)
            if total > engine.config.max_prompt_chars:
                raise ValueError(f"the messages hold {total:,} characters; the limit is "
                                 f"{engine.config.max_prompt_chars:,}")
            params = engine.params(
                body.get("max_completion_tokens") or body.get("max_tokens"),
                body.get("temperature"), body.get("top_p"), body.get("seed"))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        cancel = CancelToken()
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        unread = await asyncio.to_thread(_look, engine, messages, media) if media else []
        prefix = (f"(I can't read {' or '.join(unreadable)} sent as links or files: send them inline "
                  "as base64 data.)\n\n") if unreadable else ""
        if unread:
            prefix += f"(I couldn't read {'; '.join(unread)}.)\n\n"
        events = iterate_in_thread(lambda: engine.complete(messages, params, cancel), cancel)

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id(),
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        if body.get("stream"):
            async def sse() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": prefix})
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        yield chunk({"content": ev.text})
                    elif isinstance(ev, Error):
                        yield f"data: {json.dumps({'error': {'message': ev.message, 'type': 'server_error'}})}\n\n"
                    elif isinstance(ev, Done):
                        yield chunk({}, _finish(ev.usage), _usage(ev.usage))
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        parts, done, errors, notices = [prefix], None, [], []
        async for ev in events:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            elif isinstance(ev, Error):
                errors.append(ev.message)
            elif isinstance(ev, Notice):
                notices.append(ev.message)
            elif isinstance(ev, Done):
                done = ev
        if errors and len(parts) == 1:
            return _error(503, " ".join(errors), "server_error")
        usage = done.usage if done else {}
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id(),
                "choices": [{"index": 0, "finish_reason": _finish(usage),
                             "message": {"role": "assistant", "content": "".join(parts)}}],
                "usage": _usage(usage), "notices": notices}

    return router


def _finish(usage: dict) -> str:
    reason = usage.get("finish_reason", "stop")
    return "length" if reason == "length" else "stop"


def _usage(usage: dict) -> dict:
    p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
