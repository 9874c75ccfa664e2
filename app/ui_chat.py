"""The chat's turns on the page: send, answer again, edit a sent message, switch branches, and
the conversation's own settings.

Every turn the page starts runs through `stream`: the session's events on a thread of their
own (`batched`), drawn into the chat at most once a frame, the turn's CancelToken kept in
`ActiveTurns` for Stop. A conversation is a tree (engine/store.py): an answer asked for again
and an edited message are siblings of what they replace, each shown with "‹ 2/2 ›" links
that switch the branch shown (assets/chat.js turns a click on one into `switch`).
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, Iterator

import gradio as gr

from app.panels import media_content, model_title
from engine.events import CancelToken, Done, Error, MediaResult, Notice, Perceived, Progress, TextDelta, ToolCall

FRAME_S = 0.1  # at most one redraw of a streaming answer per frame
JOIN_S = 10.0  # how long a closed page waits for its cancelled turn to wind down


class ActiveTurns:
    """CancelTokens of running turns, keyed by browser session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}

    def start(self, key: str) -> CancelToken:
        token = CancelToken()
        with self._lock:
            self._tokens[key] = token
        return token

    def stop(self, key: str) -> bool:
        with self._lock:
            token = self._tokens.get(key)
        if token is None:
            return False
        token.cancel("stopped by the user")
        return True

    def finish(self, key: str, token: CancelToken) -> None:
        with self._lock:
            if self._tokens.get(key) is token:
                del self._tokens[key]


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def batched(run: Callable[[], Iterator], cancel: CancelToken, frame_s: float = FRAME_S) -> Iterator[list]:
    """The events of `run()` in order, in lists handed out at most once per `frame_s`.

    `run()` is iterated on a thread of its own: a redraw of the whole chat per token held a
    135M model to a quarter of its speed. The first event of a quiet spell goes out at once
    (the first token is not held back). An exception in the turn is raised here, after the
    events before it. Closed early (the page went away, Gradio closes the handler), the turn
    is cancelled and waited for, boundedly: decoding stops within one token. Only text and
    progress are merged: a batch ends at any other event (a tool starting, a result, an
    error), so each change of state is drawn, however fast the next one follows.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    end = object()

    def more(batch: list) -> bool:
        return isinstance(batch[-1], (TextDelta, Progress))

    def work() -> None:
        try:
            for event in run():
                events.put(event)
        except BaseException as exc:  # (raised again on the handler's thread)
            events.put(_Failed(exc))
        finally:
            events.put(end)

    worker = threading.Thread(target=work, name="ui-turn", daemon=True)
    worker.start()
    finished, due = False, 0.0
    try:
        while not finished:
            batch = [events.get()]
            while more(batch) and (left := due - time.monotonic()) > 0:
                try:
                    batch.append(events.get(timeout=left))
                except queue.Empty:
                    break
            while more(batch) and not events.empty():
                batch.append(events.get())
            finished = batch[-1] is end
            failed = next((b for b in batch if isinstance(b, _Failed)), None)
            batch = [b for b in batch if b is not end and not isinstance(b, _Failed)]
            if batch:
                due = time.monotonic() + frame_s
                yield batch
            if failed is not None:
                raise failed.exc
    finally:
        if not finished:
            cancel.cancel("the page went away")
        worker.join(JOIN_S)


@dataclass
class Drawn:
    """A turn being drawn into the chat: the messages shown, the answer growing at their end,
    and what the turn said besides."""

    shown: list
    answer: dict = field(default_factory=lambda: {"role": "assistant", "content": ""})
    notices: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    done: Done | None = None
    working: str | None = None

    def __post_init__(self) -> None:
        self.shown.append(self.answer)

    def show(self, ev) -> None:
        """One event into the chat."""
        answer = self.answer
        if isinstance(ev, ToolCall):
            self.working = ev.name.replace("_", " ")
            answer["content"] = f"🛠️ {self.working}…"
        elif isinstance(ev, Progress):
            answer["content"] = f"🛠️ {self.working} · {ev.stage} {ev.fraction:.0%}"
        elif isinstance(ev, Perceived):
            answer["content"] = f"👀 looked at {ev.name}…"
            self.working = "perception"
        elif isinstance(ev, MediaResult):
            self.shown.insert(len(self.shown) - 1, {
                "role": "assistant", "content": media_content(ev.path, ev.kind, name=ev.meta.get("name", ""))})
        elif isinstance(ev, TextDelta):
            if self.working:
                answer["content"], self.working = "", None
            answer["content"] += ev.text
        elif isinstance(ev, Notice):
            self.notices.append(ev.message)
            gr.Info(ev.message)
        elif isinstance(ev, Error):
            self.errors.append(ev.message)
            answer["content"] += f"\n\n⚠️ {ev.message}"
        elif isinstance(ev, Done):
            self.done = ev

    @property
    def stored(self) -> bool:
        """Whether the turn was stored (else it was refused before anything was)."""
        return self.done is not None and bool(self.done.turn_id)


def stream(active: ActiveTurns, key: str, run: Callable[[CancelToken], Iterator], drawn: Drawn) -> Iterator[None]:
    """Run a turn (`run(cancel)`: the session's events) into `drawn`, yielding after each
    frame's worth of events; Stop (`active.stop(key)`) cancels it."""
    cancel = active.start(key)
    try:
        with closing(batched(lambda: run(cancel), cancel)) as batches:
            for batch in batches:
                for ev in batch:
                    drawn.show(ev)
                if not all(isinstance(ev, Done) for ev in batch):
                    yield
    finally:
        active.finish(key, cancel)


def turn_footer(done: Done, notices=()) -> str:
    """The line under an answer: the notices, then tokens and speed when tokens were decoded
    (a media reply decodes none: it says what it made in its text)."""
    n, t = done.usage.get("completion_tokens", 0), done.timings
    bits = [f"{n} tokens"] if n else []
    if n and t.get("decode_tok_s"):
        bits.append(f"{t['decode_tok_s']:.1f} tok/s")
    if n and t.get("ttft_ms") is not None:
        bits.append(f"first token {t['ttft_ms']:.0f} ms")
    if done.interrupted:
        bits.append("stopped")
    return " ".join([*notices, *(["<small>" + " · ".join(bits) + "</small>"] if bits else [])])


def model_choices(engine) -> list[tuple[str, str]]:
    return [(model_title(m) + (" (default)" if m == engine.config.llm.model else ""), m)
            for m in engine.llm_choices()]


def plain_file_refusals(box: gr.MultimodalTextbox) -> gr.MultimodalTextbox:
    """The page's browser offers only the accepted kinds, but a client can upload anything: Gradio
    then refuses the file as "Invalid file type: None" and prints a traceback as if it had crashed.
    Here the refusal names the file and what is accepted, and is not logged as a crash."""
    from gradio_client import utils as client_utils

    accepted = box.file_types
    original = box.preprocess

    def preprocess(payload):
        for f in getattr(payload, "files", None) or ():
            if accepted and not client_utils.is_valid_file(f.path, accepted):
                raise gr.Error(f"{str(f.orig_name or 'the file')[:120]} is not an image, audio, video or .glb file",
                               print_exception=False)
        return original(payload)

    box.preprocess = preprocess
    return box
