"""The turn loop: `Session.submit(turn) -> Iterator[Event]`.

Engine owns what is shared across conversations (config, store, the LLM
backend and the lock that serialises model work); Session is one
conversation. A turn: validate input and media -> store the user turn ->
fit history into the context -> stream the answer (cancel checked every
token) -> store the answer (complete / interrupted / error) -> Done.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Generator, Iterator, Sequence

from engine import media as media_mod
from engine.config import Config
from engine.context import fit
from engine.errors import InputError, Unavailable
from engine.events import CancelToken, Done, Error, Event, Notice, TextDelta
from engine.llm import load_backend
from engine.llm.base import GenParams, LLMBackend, Message
from engine.store import Store

# Until the modality adapters land, the assistant says so in its answer.
UNREADABLE = {
    "image": "images",
    "audio": "audio",
    "video": "video",
}


@dataclass(frozen=True)
class Turn:
    text: str = ""
    attachments: tuple[str, ...] = ()  # paths of files to attach
    names: tuple[str, ...] = ()  # the user's file names, when the paths are temporary
    max_new_tokens: int | None = None
    temperature: float | None = None


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.data_path)
        self.model_lock = threading.Lock()  # one model, one turn at a time
        self._load_lock = threading.Lock()
        self._llm: LLMBackend | None = None
        self._llm_error: Unavailable | None = None
        self._loading = False
        self.last_usage: dict = {}

    @property
    def media_dir(self):
        return self.store.media_dir

    # the language model, loaded once
    def llm(self) -> LLMBackend:
        with self._load_lock:
            if self._llm is None and self._llm_error is None:
                self._loading = True
                try:
                    self._llm = load_backend(self.config.llm, self.config.data_path / "models")
                except Unavailable as exc:
                    self._llm_error = exc
                except Exception as exc:  # a broken file or library: report, never crash the app
                    self._llm_error = Unavailable(f"loading {self.config.llm.model} failed: {exc}",
                                                  "check --llm and the logs")
                finally:
                    self._loading = False
            if self._llm_error is not None:
                raise self._llm_error
            assert self._llm is not None
            return self._llm

    def start_loading(self) -> threading.Thread:
        """Load the LLM in the background so the page is usable at once."""
        self._loading = True

        def load():
            try:
                self.llm()
            except Unavailable:
                pass

        thread = threading.Thread(target=load, name="llm-load", daemon=True)
        thread.start()
        return thread

    def llm_state(self) -> tuple[str, str]:
        """(state, detail): ready | loading | unavailable | not loaded."""
        if self._llm is not None:
            return "ready", self._llm.name
        if self._llm_error is not None:
            return "unavailable", str(self._llm_error).removeprefix("unavailable: ")
        return ("loading" if self._loading else "not loaded"), self.config.llm.model

    def session(self, conversation_id: str | None = None) -> "Session":
        return Session(self, conversation_id)

    def params(self, max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> GenParams:
        c = self.config.llm
        return GenParams(
            max_new_tokens=max(1, min(max_new_tokens or c.max_new_tokens, c.context_tokens - 1)),
            temperature=c.temperature if temperature is None else max(0.0, temperature),
            top_p=c.top_p if top_p is None else min(max(top_p, 0.01), 1.0),
            seed=c.seed if seed is None else seed,
        )

    def complete(self, messages: Sequence[Message], params: GenParams,
                 cancel: CancelToken) -> Iterator[Event]:
        """A stateless completion (the OpenAI API): nothing is stored."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        _, usage, timings = yield from self.answer(messages, params, cancel)
        yield Done(usage, timings, interrupted=usage.get("finish_reason") == "cancelled")

    def answer(self, messages: Sequence[Message], params: GenParams,
               cancel: CancelToken) -> Generator[Event, None, tuple[str, dict, dict]]:
        """Fit, wait for the model, stream. Returns (text, usage, timings)."""
        started = time.monotonic()
        usage: dict = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "error"}
        if self.llm_state()[0] == "loading":
            yield Notice("The language model is still loading (the first start converts its weights once); "
                         "the answer starts as soon as it is ready.")
        try:
            llm = self.llm()
        except Unavailable as exc:
            yield Error(f"The language model is {exc}", recoverable=True)
            return "", usage, {}
        budget = llm.context_tokens - min(params.max_new_tokens, llm.context_tokens // 2)
        fitted = fit(messages, llm.count_tokens, budget)
        if fitted.dropped or fitted.truncated_chars:
            yield Notice(fitted.notice(llm.context_tokens))
        while not self.model_lock.acquire(timeout=0.05):
            if cancel.cancelled:
                usage["finish_reason"] = "cancelled"
                return "", usage, {}
        parts: list[str] = []
        first = end = None
        queued = time.monotonic()
        try:
            stream = llm.generate(fitted.messages, (), params, cancel)
            while True:
                try:
                    event = next(stream)
                except StopIteration as stop:
                    usage = stop.value or usage
                    break
                if isinstance(event, TextDelta):
                    first = first or time.monotonic()
                    parts.append(event.text)
                yield event
        except Exception as exc:  # the backend failed mid-answer: keep what we have
            yield Error(f"The language model failed: {exc}", recoverable=True)
            usage = {**usage, "finish_reason": "error"}
        finally:
            end = time.monotonic()
            self.model_lock.release()
        n = usage.get("completion_tokens", 0)
        timings = {"queue_ms": round((queued - started) * 1000, 1),
                   "ttft_ms": round((first - queued) * 1000, 1) if first else None,
                   "total_ms": round((end - started) * 1000, 1),
                   "decode_tok_s": round((n - 1) / (end - first), 2) if first and n > 1 and end > first else None}
        self.last_usage = {**usage, **timings}
        return "".join(parts), usage, timings

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self.store.close()


class Session:
    """One conversation. Created lazily in the store on the first turn."""

    def __init__(self, engine: Engine, conversation_id: str | None = None) -> None:
        self.engine = engine
        self.id = conversation_id
        if conversation_id and engine.store.get_conversation(conversation_id) is None:
            raise InputError(f"no conversation {conversation_id!r}")

    def history(self) -> list[Message]:
        """Stored turns as LLM messages (errors and empty answers left out)."""
        if not self.id:
            return []
        return [{"role": t.role, "content": t.content} for t in self.engine.store.turns(self.id)
                if t.content and t.status != "error"]

    def submit(self, turn: Turn, cancel: CancelToken | None = None) -> Iterator[Event]:
        cancel = cancel or CancelToken()
        cfg, store = self.engine.config, self.engine.store
        text = turn.text.strip()
        try:
            records = self._validate(turn, text)
        except InputError as exc:
            yield Error(str(exc), recoverable=True)
            yield Done(conversation_id=self.id or "")
            return
        if self.id is None:
            self.id = store.create_conversation()
        history = self.history()
        store.add_turn(self.id, "user", text, media=records)
        if not store.get_conversation(self.id)["title"]:
            store.rename_conversation(self.id, _title(text, records))

        prefix = _unreadable_note(records)
        if prefix:
            yield TextDelta(prefix)
        answer, usage, timings = "", {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}, {}
        errors: list[str] = []
        if text:
            messages = [{"role": "system", "content": cfg.system_prompt}, *history, {"role": "user", "content": text}]
            params = self.engine.params(turn.max_new_tokens, turn.temperature)
            stream = self.engine.answer(messages, params, cancel)
            while True:
                try:
                    event = next(stream)
                except StopIteration as stop:
                    answer, usage, timings = stop.value
                    break
                if isinstance(event, Error):
                    errors.append(event.message)
                yield event
        interrupted = cancel.cancelled
        status = "interrupted" if interrupted else ("error" if errors else "complete")
        meta = {"usage": usage, "timings": timings, **({"error": " ".join(errors)} if errors else {})}
        turn_id = store.add_turn(self.id, "assistant", prefix + answer, status=status, meta=meta)
        yield Done(usage, timings, interrupted, self.id, turn_id)

    def _validate(self, turn: Turn, text: str) -> tuple[media_mod.MediaRecord, ...]:
        cfg = self.engine.config
        if not text and not turn.attachments:
            raise InputError("The message is empty: type something or attach a file.")
        if len(text) > cfg.max_prompt_chars:
            raise InputError(f"The message is {len(text):,} characters; the limit is {cfg.max_prompt_chars:,} "
                             "(raise it with --set max_prompt_chars=N).")
        names = list(turn.names) + [None] * (len(turn.attachments) - len(turn.names))
        return tuple(media_mod.ingest(p, self.engine.media_dir, cfg.max_upload_mb * 1_000_000, n)
                     for p, n in zip(turn.attachments, names))


def _title(text: str, records) -> str:
    words = " ".join(text.split())
    if not words:
        words = ", ".join(r.name for r in records) or "New chat"
    return words if len(words) <= 48 else words[:47].rsplit(" ", 1)[0] + "..."


def _unreadable_note(records) -> str:
    kinds = sorted({r.kind for r in records}, key=list(UNREADABLE).index)
    if not kinds:
        return ""
    what = " or ".join(UNREADABLE[k] for k in kinds)
    names = ", ".join(r.name for r in records)
    return (f"(I received {names}, but I can't read {what} yet: media understanding is not part of this "
            "version, so I can only use your text.)\n\n")
