"""Engine: what is shared across conversations.

The config, the store, the models behind each role (engine/roles.py), and
the lock that serialises model work. `answer()` is the one place an LLM
answer is produced: fit the history, wait for the model, stream, time it.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import replace
from typing import Generator, Iterator, Sequence

from engine.config import Config
from engine.context import Fitted, fit
from engine.errors import Unavailable
from engine.events import CancelToken, Done, Error, Event, Notice, Returning, TextDelta
from engine.llm.base import GenParams, LLMBackend, Message
from engine.llm.decoding import StopText
from engine.queueing import FairLock, QueueFull
from engine.roles import Role, build_roles
from engine.store import Store


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.data_path)
        self._llms: dict[str, Role] = {}  # other installed LLMs a conversation picked (llm_choices)
        self._llm_lock = threading.Lock()
        self.roles: dict[str, Role] = build_roles(config)
        # one model, one turn at a time, served in arrival order; beyond max_queue waiting, refused
        self.model_lock = FairLock(config.max_queue)
        from engine.perception.perceiver import Perceiver
        from engine.tools import speech_tool
        from engine.tools.run import Generators

        # media tools: generators/ backends loaded on first use, plus this engine's voice for spoken audio
        self.generators = Generators(config, [speech_tool.entry(self.roles["tts"], config.tts)])
        self.perceiver = Perceiver(self)  # attached media -> grounded facts (engine/perception/)
        from engine import memory_budget

        memory_budget.configure(config.max_request_memory_mb)  # what decoding one request's media may take
        # (what one answer used, its usage and experts, travels in that turn's events, not here)

    @property
    def media_dir(self):
        return self.store.media_dir

    def set_speech(self, voice: str | None = None, rate: float | None = None) -> None:
        """Change the voice or speaking rate; the TTS reloads on next use."""
        from engine.config import ConfigError, validate

        tts = replace(self.config.tts, voice=voice or self.config.tts.voice,
                      rate=self.config.tts.rate if rate is None else float(rate))
        config = replace(self.config, tts=tts)
        try:
            validate(config)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if tts != self.config.tts:
            self.config = config
            # only the tts role is new; with the talker voice it speaks through the loaded LLM
            kept = {name: role for name, role in self.roles.items() if name != "tts"}
            old, self.roles["tts"] = self.roles["tts"], build_roles(config, keep=kept)["tts"]
            old.close()

    def llm(self, model: str = "") -> LLMBackend:
        """The configured language model, or another installed one by name (llm_choices)."""
        return self._llm_role(model).get()

    def llm_choices(self) -> list[str]:
        """The language models a conversation can pick: the configured one, then the packaged ones."""
        from engine.packaged import names

        return list(dict.fromkeys([self.config.llm.model, *names("llm")]))

    def load_llm(self, model: str = "") -> threading.Thread:
        """Load an installed LLM in the background (a conversation just picked it)."""
        return self._llm_role(model).start()

    def _llm_role(self, model: str = ""):
        """The configured LLM's role, or another installed model's, made on first use and kept
        (one role per name: the choices are a short fixed list, so what is resident is bounded)."""
        if not model or model == self.config.llm.model:
            return self.roles["llm"]
        if model not in self.llm_choices():
            raise ValueError(f"no language model {model!r} here; the choices: {', '.join(self.llm_choices())}")
        with self._llm_lock:
            if model not in self._llms:
                # (its own file, no hash pin; the talker voice speaks through the configured model only)
                config = replace(self.config, llm=replace(self.config.llm, model=model, sha256=""),
                                 tts=replace(self.config.tts, backend="piper"))
                self._llms[model] = build_roles(config)["llm"]
            return self._llms[model]

    def _scheduler(self):
        llm = self.roles["llm"].loaded
        return llm.scheduler if llm is not None and llm.schedules else None

    @property
    def model_queue(self):
        """Where requests wait for the model: the LLM's scheduler when it batches its own uses
        (engine/llm/scheduler.py), else the lock (waiting, busy, full(), max_waiting)."""
        return self._scheduler() or self.model_lock

    def model_use(self):
        """Hold the model for a direct use (a router choice, a JSON call, the GPU hand-off): the
        lock, unless the LLM schedules its own uses (each is then a sequence of its batch)."""
        return contextlib.nullcontext() if self._scheduler() is not None else self.model_lock

    def llm_state(self, model: str = "") -> tuple[str, str]:
        state, detail = self._llm_role(model).state()
        return state, detail or model or self.config.llm.model

    def start_loading(self) -> threading.Thread:
        """Load every role in the background, the language model first (every answer waits on
        it; the voice roles follow); the returned thread ends when all have."""
        first = self.roles["llm"].start()
        threads = [first, *(role.start(after=first) for name, role in self.roles.items() if name != "llm")]
        waiter = threading.Thread(target=lambda: [t.join() for t in threads], name="load-all", daemon=True)
        waiter.start()
        return waiter

    def params(self, max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, facts: bool = False) -> GenParams:
        """`facts`: the prompt's last turn carries perception facts or a transcript; unless a
        temperature is given, it is decoded at llm.facts_temperature (0: greedy), so the answer
        quotes what was found instead of sampling around it."""
        c = self.config.llm
        default = c.facts_temperature if facts else c.temperature
        return GenParams(
            max_new_tokens=max(1, min(max_new_tokens or c.max_new_tokens, c.context_tokens - 1)),
            temperature=default if temperature is None else max(0.0, temperature),
            top_p=c.top_p if top_p is None else min(max(top_p, 0.01), 1.0),
            seed=c.seed if seed is None else seed,
        )

    def complete(self, messages: Sequence[Message] | str, params: GenParams,
                 cancel: CancelToken) -> Iterator[Event]:
        """A stateless completion (the OpenAI API): nothing is stored. It waits behind the page's
        and voice's turns when the model is busy. A string is a raw prompt (no chat template)."""
        from engine.llm.scheduler import API

        params = replace(params, priority=API)
        if isinstance(messages, str):
            pass
        elif not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        if params.response_format is not None and not isinstance(messages, str):
            messages = [{**messages[0], "content": messages[0]["content"] + json_note(params.response_format)},
                        *messages[1:]]
        _, usage, timings = yield from self.answer(messages, params, cancel)
        yield Done(usage, timings, interrupted=usage.get("finish_reason") == "cancelled")

    def answer(self, messages: Sequence[Message], params: GenParams, cancel: CancelToken,
               media: Sequence = ()) -> Generator[Event, None, tuple[str, dict, dict]]:
        """Fit, wait for the model, stream. Returns (text, usage, timings). `media`: this turn's
        records; an omni backbone looks at the images / video itself (the others ignore them)."""
        started = time.monotonic()
        usage: dict = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "error"}
        try:
            state = self.llm_state(params.model)[0]
        except ValueError as exc:  # a conversation's model that is no longer installed
            yield Error(f"{exc}: pick one in the conversation's settings.", recoverable=True)
            return "", usage, {}
        if state == "loading" or (params.model and state == "not loaded"):
            yield Notice("The language model is still loading (the first start converts its weights once); "
                         "the answer starts as soon as it is ready.")
        try:
            llm = self.llm(params.model)
        except Unavailable as exc:
            yield Error(f"The language model is {exc}", recoverable=True)
            return "", usage, {}
        budget = llm.context_tokens - min(params.max_new_tokens, llm.context_tokens // 2)
        fitted = fit(messages, llm.count_tokens, budget) if not isinstance(messages, str) else Fitted(messages, 0, 0)
        if fitted.dropped or fitted.truncated_chars:
            yield Notice(fitted.notice(llm.context_tokens))
        lock = None if llm.schedules else self.model_lock  # (a scheduling backend queues its own)
        waiting = self.model_queue
        if waiting.busy and not waiting.full():
            ahead = waiting.waiting + (lock is not None)
            if ahead:
                yield Notice(f"Waiting for the model: {ahead} request{'s' if ahead > 1 else ''} ahead of this one.")
        try:
            if lock is not None and not lock.acquire(cancelled=lambda: cancel.cancelled, refuse_when_full=True):
                usage["finish_reason"] = "cancelled"
                return "", usage, {}
        except QueueFull:
            yield from self._busy(usage, waiting)
            return "", usage, {}
        parts: list[str] = []
        first = end = None
        queued = time.monotonic()
        try:
            seen = [m for m in media if m.kind in llm.media_kinds]
            unseen = sorted({m.kind for m in media if m.kind in ("image", "video")} - {m.kind for m in seen})
            if unseen and self.config.perception.vl_model == "backbone":
                yield Notice(f"{llm.name} reads text only, so it answers from what the perception tools found in "
                             f"the {' and '.join(unseen)}; set --llm to an omni model (Qwen2.5-Omni, Qwen3-Omni) "
                             "for it to look at them itself.")
            stops = StopText(params.stop)
            for event in (stream := Returning(llm.generate(fitted.messages, seen, params, cancel))):
                if isinstance(event, TextDelta):
                    first = first or time.monotonic()
                    if params.stop:  # (the text up to a stop string; the answer ends there)
                        event = replace(event, text=stops.push(event.text))
                        if stops.hit:
                            cancel.cancel("stop sequence")
                        if not (event.text or event.logprobs):
                            continue
                    parts.append(event.text)
                yield event
            if tail := stops.flush():
                parts.append(tail)
                yield TextDelta(tail)
            usage = stream.value or usage
            if stops.hit:
                usage = {**usage, "finish_reason": "stop"}
        except QueueFull:
            yield from self._busy(usage, waiting)
            return "", usage, {}
        except Exception as exc:  # the backend failed mid-answer: keep what we have
            yield Error(f"The language model failed: {exc}", recoverable=True)
            usage = {**usage, "finish_reason": "error"}
        finally:
            end = time.monotonic()
            if lock is not None:
                lock.release()
        n = usage.get("completion_tokens", 0)
        timings = {"queue_ms": round((queued - started) * 1000, 1),
                   "ttft_ms": round((first - queued) * 1000, 1) if first else None,
                   "total_ms": round((end - started) * 1000, 1),
                   "decode_tok_s": round((n - 1) / (end - first), 2) if first and n > 1 and end > first else None}
        return "".join(parts), usage, timings

    @staticmethod
    def _busy(usage: dict, waiting) -> Iterator[Event]:
        usage["finish_reason"] = "busy"
        yield Error(f"The assistant is busy: {waiting.waiting} requests are waiting for the model. "
                    "Try again in a minute.", recoverable=True)

    def close(self) -> None:
        self.generators.close()
        for role in [*self.roles.values(), *self._llms.values()]:
            role.close()
        self.store.close()


def json_note(response_format: dict) -> str:
    """What the system prompt says when the answer must be JSON (the grammar makes it so; told,
    a small model fills the fields with what was asked rather than whatever parses)."""
    schema = response_format.get("schema")
    if schema is None:
        return "\n\nReply with a single JSON object only."
    return f"\n\nReply with a single JSON object only, following this JSON Schema: {json.dumps(schema)}"
