"""Fit a conversation into the model's context window.

Drop the oldest turns first (the system prompt always stays); if the newest
message alone is still too long, keep its end (where the question usually
is) and mark the cut. Never raises on a long prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Message = dict
CUT_MARK = "[...earlier text cut to fit the context...] "


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
