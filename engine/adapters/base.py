"""The adapter contract: one file of media in, grounded facts out.

    adapter = SomeAdapter(**config)     # cheap; models load on first use
    p = adapter.perceive(path, out_dir, cancel)

`Perception.facts` is compact text for the LLM, every claim grounded in
what a tool really found (OCR lines quoted, counts, labels with scores,
times as m:ss for audio and video). `data` keeps the structure for the UI
and the API; `overlays` are images the UI shows to explain the answer
(text boxes and faces drawn on the picture, keyframe strips).
Bad media raise engine.errors.InputError with a message for the user;
`cancel` (anything with `.cancelled`) is checked between stages and raises
InterruptedError. Memory and time stay bounded for any input size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Perception:
    kind: str  # image | audio | video
    name: str  # the file name the user knows
    facts: str  # grounded text for the LLM
    data: dict = field(default_factory=dict)  # structured findings (see each adapter)
    overlays: list[str] = field(default_factory=list)  # annotated images for the perception panel
    timings_ms: dict = field(default_factory=dict)  # per stage


class CancelLike(Protocol):
    @property
    def cancelled(self) -> bool: ...


def check(cancel) -> None:
    if cancel is not None and cancel.cancelled:
        raise InterruptedError("cancelled")


def stop_on_cancel(cancel):
    """A transformers StoppingCriteria that raises InterruptedError between tokens once
    `cancel` is set (for model.generate calls)."""
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            check(cancel)
            return False

    return Cancelled()


def mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"
