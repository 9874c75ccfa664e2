"""The event stream of a turn: one small frozen dataclass per thing that happens.

`Session.submit(turn)` yields these. `to_dict()` gives the JSON form used by
the CLI (`--json`) and anything else that serialises the stream:
`{"type": "text_delta", "text": "..."}`.
"""
from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Generator, Iterator


class CancelToken:
    """Set once to ask every producer of a turn to stop at its next step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class Returning:
    """A generator's events, and what it returned once they are all read: the one place a
    StopIteration's value is unpacked. `for event in (run := Returning(gen)): ...` then `run.value`."""

    def __init__(self, generator: Generator) -> None:
        self._generator, self.value = generator, None

    def __iter__(self) -> Iterator:
        self.value = yield from self._generator


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Event:
    """Base of all events; subclasses are frozen dataclasses."""

    @property
    def type(self) -> str:
        return _snake(type(self).__name__)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "pcm":
                out["bytes"] = len(value)  # raw audio is not JSON
                continue
            if f.name == "logprobs" and not value:  # (asked for by API clients only)
                continue
            out[f.name] = asdict(value) if is_dataclass(value) else value
        return out


@dataclass(frozen=True)
class TextDelta(Event):
    text: str
    #: each token's log-probability with its alternatives, when asked (GenParams.logprobs):
    #: OpenAI's entries, {"token", "logprob", "bytes", "top_logprobs"}
    logprobs: tuple = ()


@dataclass(frozen=True)
class AudioChunk(Event):
    pcm: bytes
    sample_rate: int


@dataclass(frozen=True)
class MediaResult(Event):
    kind: str  # image | audio | video | model3d
    path: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Perceived(Event):
    """What the perception tools found in one attached file (the perception panel shows it)."""

    kind: str  # image | audio | video
    name: str
    facts: str  # the grounded text the LLM answers from
    overlays: tuple = ()  # annotated images: text boxes and faces drawn, keyframe sheets
    data: dict = field(default_factory=dict)
    ms: float = 0.0


@dataclass(frozen=True)
class Transcript(Event):
    """What the user said (a voice message or an attached audio file)."""

    text: str
    language: str = ""
    source: str = ""  # the file name, or "microphone"
    duration_s: float = 0.0


@dataclass(frozen=True)
class ToolCall(Event):
    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolCallDelta(Event):
    """A function call the model is making (OpenAI's `tools`), streamed: its name first (with
    empty arguments), then fragments of its JSON arguments. `index`: the call's place in the turn."""

    index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class Progress(Event):
    stage: str
    fraction: float


@dataclass(frozen=True)
class RouterStats(Event):
    experts: dict


@dataclass(frozen=True)
class Notice(Event):
    """Something the user should know that is not part of the answer
    (history trimmed to fit the context, a modality not readable yet)."""

    message: str


@dataclass(frozen=True)
class VoiceState(Event):
    """Voice mode's turn-taking state: listening, hearing, thinking, speaking, interrupted."""

    state: str
    reason: str = ""


@dataclass(frozen=True)
class Error(Event):
    message: str
    recoverable: bool = True


@dataclass(frozen=True)
class Done(Event):
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    interrupted: bool = False
    conversation_id: str = ""
    turn_id: int = 0
