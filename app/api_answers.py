"""The engine's events as OpenAI answers: one sampled answer collected (`Answer`), several
streamed side by side (`merged`), and the small shapes every endpoint shares (usage,
finish reason, tool calls with their ids, log-probabilities).

Shared by app/api.py (chat), app/completions_api.py and app/responses_api.py.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.events import Done, Error, Event, Notice, TextDelta, ToolCallDelta


@dataclass
class Answer:
    """What one sampled answer came to."""

    parts: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)  # index -> {"id", "name", "arguments"}
    logprobs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    notices: list = field(default_factory=list)
    done: Done | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def usage(self) -> dict:
        return self.done.usage if self.done else {}

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.parts.append(event.text)
            self.logprobs.extend(event.logprobs)
        elif isinstance(event, ToolCallDelta):
            call_of(self.calls, event)
        elif isinstance(event, Error):
            self.errors.append(event.message)
        elif isinstance(event, Notice):
            self.notices.append(event.message)
        elif isinstance(event, Done):
            self.done = event

    def tool_calls(self) -> list[dict]:
        """OpenAI's `message.tool_calls`."""
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for _, c in sorted(self.calls.items())]

    @property
    def busy(self) -> bool:
        return self.usage.get("finish_reason") == "busy"

    @property
    def failed(self) -> bool:
        return bool(self.errors) and not self.text and not self.calls


def call_of(calls: dict, event: ToolCallDelta) -> dict:
    """The call a ToolCallDelta belongs to (a new one gets its id), with its arguments so far."""
    call = calls.setdefault(event.index, {"id": f"call_{uuid.uuid4().hex[:24]}", "name": event.name, "arguments": ""})
    call["arguments"] += event.arguments
    return call


async def collect(events: AsyncIterator[Event]) -> Answer:
    answer = Answer()
    async for event in events:
        answer.add(event)
    return answer


async def merged(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """Several answers' events as they come, each with its answer's index (`n` choices)."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def held(events: AsyncIterator, event_of=lambda item: item) -> AsyncIterator | None:
    """A stream to send once its answer has started (a first token or call) or ended; None when the
    model's queue refused it. A streamed request is checked for a full queue before it starts, but
    the queue can fill between that look and the engine's (many clients at once): held back until
    the engine has answered, the refusal is still the documented 429 and not a 200 whose stream says
    "busy". The answer's first token comes no later for it. `event_of`: the Event in an item."""
    first: list = []
    async for item in events:
        first.append(item)
        event = event_of(item)
        if isinstance(event, Done) and event.usage.get("finish_reason") == "busy":
            await events.aclose()  # (the other choices of an n > 1 request stop too)
            return None
        if isinstance(event, (TextDelta, ToolCallDelta, Done)):
            break

    async def replay() -> AsyncIterator:
        for item in first:
            yield item
        async for item in events:
            yield item

    return replay()


def finish(usage: dict) -> str:
    reason = usage.get("finish_reason", "stop")
    return reason if reason in ("length", "tool_calls") else "stop"


def usage_of(answers: list[Answer]) -> dict:
    """Usage over every choice: the prompt once, every choice's tokens."""
    p = max((a.usage.get("prompt_tokens", 0) for a in answers), default=0)
    c = sum(a.usage.get("completion_tokens", 0) for a in answers)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
