"""The conversation as the model reads it, fitted into its context window.

`as_message`: a stored turn as an LLM message. What the user was shown is stored
as it was; what the model reads of it differs for two kinds of answer: a tool's
reply becomes a short note of what was made, and a stopped answer is marked.
`fit`: drop the oldest turns first (the system prompt always stays); if the newest
message alone is still too long, keep its end (where the question usually is)
and mark the cut. Never raises on a long prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from generators.base import MediaKind
from generators.tools import TOOLS

Message = dict
CUT_MARK = "[...earlier text cut to fit the context...] "
STOPPED_MARK = " (interrupted)"  # (on SmolLM2, brackets or a longer mark made answers worse)


def as_message(turn) -> Message:
    """One stored turn (store.StoredTurn) as the LLM reads it.

    A tool's reply ("Here is the video, made with ffmpeg (trim, 64x48, 2.0 s).") read
    as an answer is a sentence a small model copies as its next answer ("thanks!" ->
    "Here is the video, made with ffmpeg..."); as a note of what was made it is not.
    A stopped answer is kept (the user saw it) but marked, so that the model does not
    take its unfinished story for the answer to go on with."""
    from engine.perception.understand import with_facts

    if turn.role == "assistant" and "tool" in turn.meta:
        kinds = [m.kind for m in turn.media if not m.spoken]  # (a spoken reply is not something the tool made)
        return {"role": "assistant", "content": tool_note(turn.meta["tool"], kinds, turn.status)}
    content = with_facts(turn.content, turn.meta.get("perception", {}))
    if turn.role == "assistant" and turn.status == "interrupted":
        content += STOPPED_MARK
    return {"role": turn.role, "content": content}


def tool_note(tool: dict, kinds: Sequence[str], status: str) -> str:
    """"[video made: trim of clip.mp4]": what a tool turn made (`kinds`: the media kinds
    of its results), from what, in a few words."""
    args, name = tool.get("arguments") or {}, tool.get("name", "tool")
    refs = TOOLS[name].refs if name in TOOLS else ()  # the arguments that name a file of the conversation
    sources = ", ".join(str(args[f]) for f, _ in refs if args.get(f))
    how = str(args.get("operation") or "").replace("_", " ")
    if how:
        how += f" of {sources}" if sources else ""
    else:
        how = " ".join(str(args.get("instruction") or args.get("prompt") or "").split())
        how = _clip(how or name.replace("_", " "), 80) + (f" (from {sources})" if sources else "")
    if not kinds:
        done = "stopped" if status == "interrupted" else "done"
        return f"[{name.replace('_', ' ')} {done}, nothing made: {how}]"
    what = MediaKind(kinds[0]).noun
    count = f"{len(kinds)} {what}s" if len(kinds) > 1 else what
    return f"[{count} made: {how}]"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3].rsplit(" ", 1)[0] + "..."


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    dropped: int  # whole messages removed from the front of the history
    truncated_chars: int  # characters cut from the start of the newest message

    def notice(self, context_tokens: int) -> str:
        parts = []
        if self.dropped:
            parts.append(f"left out the {self.dropped} oldest message{'s' if self.dropped != 1 else ''}")
        if self.truncated_chars:
            parts.append(f"cut the first {self.truncated_chars:,} characters of your message")
        return f"To fit the model's {context_tokens:,}-token context I {' and '.join(parts)}." if parts else ""


def fit(messages: Sequence[Message], count: Callable[[Sequence[Message]], int], budget: int) -> Fitted:
    """Return messages whose prompt is at most `budget` tokens by `count`."""
    msgs = list(messages)
    system = [msgs.pop(0)] if msgs and msgs[0]["role"] == "system" else []
    dropped = 0
    while len(msgs) > 1 and count(system + msgs) > budget:
        msgs.pop(0)
        dropped += 1
        # never start the history on an assistant message
        while len(msgs) > 1 and msgs[0]["role"] == "assistant":
            msgs.pop(0)
            dropped += 1
    if count(system + msgs) <= budget:
        return Fitted(system + msgs, dropped, 0)
    last, text = msgs[-1], msgs[-1]["content"]
    if count(system + [{**last, "content": CUT_MARK}]) > budget:
        if system:  # a system prompt larger than the context: drop it rather than fail
            inner = fit([last], count, budget)
            return Fitted(inner.messages, dropped + 1, inner.truncated_chars)
        return Fitted([{**last, "content": ""}], dropped, len(text))
    lo, hi = 0, len(text)  # binary search the longest tail that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(system + [{**last, "content": CUT_MARK + text[-mid:]}]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    kept = {**last, "content": CUT_MARK + (text[-lo:] if lo else "")}
    return Fitted(system + [kept], dropped, len(text) - lo)
