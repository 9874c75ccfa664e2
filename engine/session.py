"""The turn loop: `Session.submit(turn) -> Iterator[Event]`.

One conversation. A turn is three short steps:
- prepare: validate the input and store its media, transcribe and perceive them
  (the user's live utterance: its words are the message), plan a tool call;
- answer: the tool's result, or the LLM's answer streamed with the cancel checked
  every token; spoken sentence by sentence while it is written, when asked;
- commit: store the user turn (at once when it is certain) and the answer
  (complete / interrupted / error, with its audio) -> Done.

A conversation is a tree (engine/store.py): a turn goes after the shown leaf, or
after `parent` (an edited message: a sibling of the one it replaces, the model
reading only the branch up to it); `regenerate` answers a stored message again
beside its earlier answers. The conversation's own settings (instructions, model,
temperature: `store.settings`) apply to each answer.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Generator, Iterator

from engine import media as media_mod
from engine.tools import plan as tool_plan
from engine.context import as_message
from engine.engine import Engine
from engine.errors import InputError
from engine.events import CancelToken, Done, Error, Event, Notice, Returning, RouterStats, TextDelta, ToolCallDelta
from engine.llm.base import Message
from engine.speech.speaker import Speaker, speaker_for
from engine.store import HEAD
from engine.perception.understand import Understood, understand, unreadable_note, user_message, with_facts
from generators.base import Cancelled, RequestError


@dataclass(frozen=True)
class Turn:
    text: str = ""
    attachments: tuple[str, ...] = ()  # paths of files to attach
    names: tuple[str, ...] = ()  # the user's file names, when the paths are temporary
    spoken: bool = False  # the (single) attachment is the user's live utterance: its transcript is the message
    speak: bool = False  # answer aloud too (AudioChunk events; the audio is stored with the answer)
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None


class Gate:
    """For a turn started before it is certain to be wanted (a voice answer prepared
    speculatively while the user may still go on): the turn runs, but nothing is
    stored until the gate is opened; if it is closed instead, nothing is stored at all."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self.ok = False

    def decide(self, ok: bool) -> None:
        self.ok = ok
        self._decided.set()

    def poll(self) -> bool | None:
        return self.ok if self._decided.is_set() else None

    def wait(self) -> bool:
        self._decided.wait()
        return self.ok


@dataclass
class Prepared:
    """The user's turn, validated, perceived and planned; not stored yet."""

    turn: Turn
    text: str  # the message: the typed text, or what was heard
    records: tuple[media_mod.MediaRecord, ...]
    got: Understood
    history: list[Message]  # the conversation before this turn, as the LLM reads it
    plan: tool_plan.ToolPlan | None = None
    refusal: str = ""  # why the tool call it asks for cannot be made
    parent: object = HEAD  # the stored turn this one follows (HEAD: the shown leaf; None: a first message)
    user_id: int | None = None  # the user's turn, once stored (a regenerated answer: the stored one)


@dataclass
class Answered:
    """The answer, made but not stored yet."""

    text: str = ""
    status: str | None = None  # None: complete, or interrupted / error as the turn ended
    media: tuple = ()
    meta: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    speaker: Speaker | None = None  # its voice, whose audio is stored with it


class Session:
    """One conversation. Created lazily in the store on the first turn."""

    def __init__(self, engine: Engine, conversation_id: str | None = None) -> None:
        self.engine = engine
        self.id = conversation_id
        if conversation_id and engine.store.get_conversation(conversation_id) is None:
            raise InputError(f"no conversation {conversation_id!r}")

    def history(self, upto: int | None = None) -> list[Message]:
        """The shown branch as the LLM reads it (context.as_message; errors and empty answers
        left out); with `upto`, the branch from the first message to that turn."""
        if not self.id:
            return []
        turns = self.engine.store.turns(self.id) if upto is None else self.engine.store.turns(self.id, upto)
        return [as_message(t) for t in turns if t.content and t.status != "error"]

    def settings(self) -> dict:
        """This conversation's own instructions, model and temperature ({} for the defaults)."""
        return self.engine.store.settings(self.id) if self.id else {}

    def submit(self, turn: Turn, cancel: CancelToken | None = None, gate: Gate | None = None,
               parent: int | None = None) -> Iterator[Event]:
        """Run one turn: prepare -> answer -> commit. With a `gate` (a voice answer prepared
        while the user may still go on), the answer is made meanwhile and the commit waits for
        the gate: opened, the turn is stored; closed, nothing is. With `parent`, the turn goes
        after that stored turn instead of the shown leaf (0: as a new first message): an edit."""
        cancel = cancel or CancelToken()
        if parent is None:  # after whatever is shown when it is stored (a voice turn and a typed one alike)
            parent = HEAD
        elif self.id is None or (parent and self.engine.store.turn(self.id, parent) is None):
            yield Error(f"There is no turn {parent} in this conversation to branch from.", recoverable=True)
            yield Done(conversation_id=self.id or "")
            return
        prepared = yield from self._prepare(turn, cancel, parent or None)
        if prepared is None:  # refused, or nothing heard: said so, nothing stored
            yield Done(conversation_id=self.id or "")
            return
        if gate is None:
            self._store_user(prepared)  # certain: stored before the answer, whatever becomes of it
        elif prepared.plan is not None and not gate.wait():  # no media made for an utterance that goes on
            yield Done(conversation_id=self.id or "", interrupted=True)
            return
        answered = yield from self._answer(prepared, turn.speak, cancel)
        if gate is not None:
            if not gate.wait():
                yield Done(answered.usage, answered.timings, True, self.id or "")  # the user went on: never was
                return
            self._store_user(prepared)
        yield self._commit(answered, cancel, prepared.user_id)

    def regenerate(self, answer_id: int, cancel: CancelToken | None = None) -> Iterator[Event]:
        """Answer the message that stored answer `answer_id` answered once more: a new answer
        beside it (its sibling, shown), sampled (at least at temperature 0.7 with a fresh seed:
        asking again means wanting another answer). Its media and what was found in them are
        the stored ones; a tool request is planned and run again."""
        import random

        cancel = cancel or CancelToken()
        store = self.engine.store
        answer = store.turn(self.id, answer_id) if self.id else None
        asked = store.turn(self.id, answer.parent_id) if answer is not None and answer.parent_id else None
        if answer is None or answer.role != "assistant" or asked is None:
            yield Error(f"There is no answer {answer_id} in this conversation to answer again.", recoverable=True)
            yield Done(conversation_id=self.id or "")
            return
        from engine.perception.understand import Understood

        names = {r.name: r.sha256 for r in asked.media}
        got = Understood(heard={names[n]: h for n, h in asked.meta.get("transcripts", {}).items() if n in names},
                         facts=asked.meta.get("perception", {}), overlays=asked.meta.get("overlays", {}))
        temperature = max(self.settings().get("temperature", self.engine.config.llm.temperature), 0.7)
        turn = Turn(asked.content, temperature=temperature, seed=random.randrange(2**31))
        prepared = Prepared(turn, asked.content, asked.media, got, self.history(asked.parent_id) if asked.parent_id
                            else [], parent=asked.parent_id, user_id=asked.id)
        self._plan(prepared, cancel)
        answered = yield from self._answer(prepared, False, cancel)
        yield self._commit(answered, cancel, asked.id)

    def _prepare(self, turn: Turn, cancel: CancelToken, parent) -> Generator[Event, None, Prepared | None]:
        """Validate and store the attachments, transcribe and perceive them, plan a tool call."""
        text = turn.text.strip()
        try:
            records = self._validate(turn, text)
        except InputError as exc:
            yield Error(str(exc), recoverable=True)
            return None
        try:
            got = yield from understand(self.engine, records, turn.spoken, cancel, text)
        except Cancelled:  # stopped while the attachments were looked at: nothing stored, the page gives it back
            if not cancel.cancelled:
                raise
            yield Notice("Stopped before the answer began: nothing was stored.")
            return None
        text = user_message(text, records, got.heard, turn.spoken)
        if turn.spoken and not text:
            yield Notice("I didn't catch any words in that.")
            return None
        history = self.history() if parent is HEAD else self.history(parent) if parent else []
        prepared = Prepared(turn, text, records, got, history, parent=parent)
        self._plan(prepared, cancel)
        return prepared

    def _plan(self, prepared: Prepared, cancel: CancelToken) -> None:
        """The tool call the message asks for, if any (or why it cannot be made)."""
        if not prepared.text:
            return
        try:
            earlier = tool_plan.conversation_media(self.engine.store, self.id, prepared.parent)
            prepared.plan = tool_plan.plan(self.engine, prepared.text, earlier, prepared.records, cancel)
        except RequestError as exc:  # e.g. nothing to edit: said as an error, stored as one
            prepared.refusal = str(exc)
        except Cancelled:  # stopped while the LLM chose: the answer stops at once too
            if not cancel.cancelled:
                raise

    def _answer(self, p: Prepared, speak: bool, cancel: CancelToken) -> Generator[Event, None, Answered]:
        """The answer: a refusal, a tool's result, or the LLM's words; spoken when asked."""
        speaker, why_not = speaker_for(self.engine, cancel) if speak else (None, None)
        if p.refusal:
            yield Error(p.refusal, recoverable=True)
            return Answered(p.refusal, "error", meta={"error": p.refusal})
        if p.plan is not None:
            return (yield from self._tool(p.plan, speaker, cancel))
        if why_not is not None:
            yield why_not
        return (yield from self._reply(p, speaker, cancel))

    def _tool(self, plan, speaker: Speaker | None, cancel: CancelToken) -> Generator[Event, None, Answered]:
        """Run the tool and say what was made."""
        from engine.tools import run as toolrun

        text, records, status = yield from toolrun.run(self.engine, plan, cancel)
        yield TextDelta(text)
        if speaker is not None and not cancel.cancelled:
            speaker.push(text)
            yield from speaker.finish()
        meta = {"tool": {"name": plan.name, "arguments": plan.arguments, "chosen_by": plan.chosen_by}}
        return Answered(text, status, tuple(records), meta, speaker=speaker)

    def _reply(self, p: Prepared, speaker: Speaker | None, cancel: CancelToken) -> Generator[Event, None, Answered]:
        """The LLM's answer, streamed (and spoken while it is written)."""
        engine = self.engine
        prefix = unreadable_note(engine, p.records, p.got)
        if prefix:
            yield TextDelta(prefix)
            if speaker is not None:
                speaker.push(prefix)
        if not p.text and not prefix:
            prefix = f"(I couldn't make out any words in {', '.join(r.name for r in p.records)}.)"
            yield TextDelta(prefix)
        answered = Answered(prefix, usage={"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"},
                            speaker=speaker)
        if p.text:
            own = self.settings()
            messages = [{"role": "system", "content": own.get("instructions") or engine.config.system_prompt},
                        *p.history, {"role": "user", "content": with_facts(p.text, p.got.facts)}]
            grounded = bool(p.got.facts) or (bool(p.got.heard) and not p.turn.spoken)  # facts or a file's transcript
            # (the conversation's temperature stands in for llm.temperature; grounded turns keep theirs)
            temperature = p.turn.temperature if p.turn.temperature is not None else \
                None if grounded else own.get("temperature")
            params = replace(engine.params(p.turn.max_new_tokens, temperature, seed=p.turn.seed, facts=grounded),
                             model=own.get("model", ""),
                             trace=speaker.trace if speaker is not None else None)  # (the talker's states)
            answered.meta["model"] = params.model or engine.config.llm.model
            errors, calls = [], {}
            for event in (stream := Returning(engine.answer(messages, params, cancel, p.records))):
                if isinstance(event, Error):
                    errors.append(event.message)
                elif isinstance(event, ToolCallDelta):  # a client's function (realtime tools): kept as written
                    call = calls.setdefault(event.index, {"name": event.name, "arguments": ""})
                    call["arguments"] += event.arguments
                elif isinstance(event, RouterStats):  # MoE models: which experts this answer used
                    answered.meta["router_stats"] = event.experts
                yield event
                if speaker is not None and isinstance(event, TextDelta):
                    speaker.push(event.text)
                    yield from speaker.ready()
            text, answered.usage, answered.timings = stream.value
            answered.text += text
            if calls:
                from engine.llm.tool_calls import calls_text

                answered.text += calls_text([calls[i] for i in sorted(calls)])
                answered.meta["function_calls"] = [calls[i] for i in sorted(calls)]
            answered.meta.update({"usage": answered.usage, "timings": answered.timings,
                                  **({"error": " ".join(errors)} if errors else {})})
        if speaker is not None:
            yield from speaker.finish()
        return answered

    def _store_user(self, p: Prepared) -> None:
        """The user's turn, with its media, transcripts and what perception found."""
        store = self.engine.store
        if self.id is None:
            self.id = store.create_conversation()
        heard = p.got.heard
        p.user_id = store.add_turn(self.id, "user", p.text, parent=p.parent, media=p.records,
                       meta={"transcripts": {r.name: heard[r.sha256] for r in p.records if r.sha256 in heard},
                             **({"perception": p.got.facts, "overlays": p.got.overlays} if p.got.facts else {})})
        if not store.get_conversation(self.id)["title"]:
            store.rename_conversation(self.id, _title(p.text, p.records))

    def _commit(self, answered: Answered, cancel: CancelToken, asked: int | None) -> Done:
        """Store the answer (after the user's turn `asked`, with its spoken audio) and say the
        turn is done."""
        audio = answered.speaker.store(self.engine) if answered.speaker is not None else None
        meta = {**answered.meta, **({"speech": answered.speaker.timings()} if answered.speaker is not None else {})}
        status = answered.status or ("interrupted" if cancel.cancelled else "error" if "error" in meta else "complete")
        turn_id = self.engine.store.add_turn(self.id, "assistant", answered.text, status=status, parent=asked,
                                             media=(*answered.media, *((audio,) if audio else ())), meta=meta)
        return Done(answered.usage, answered.timings, cancel.cancelled, self.id, turn_id)

    def _validate(self, turn: Turn, text: str) -> tuple[media_mod.MediaRecord, ...]:
        cfg = self.engine.config
        if not text and not turn.attachments:
            raise InputError("The message is empty: type something or attach a file.")
        if len(text) > cfg.max_prompt_chars:
            raise InputError(f"The message is {len(text):,} characters; the limit is {cfg.max_prompt_chars:,} "
                             "(raise it with --set max_prompt_chars=N).")
        names = list(turn.names) + [None] * (len(turn.attachments) - len(turn.names))
        return tuple(replace(media_mod.ingest(p, self.engine.media_dir, cfg.max_upload_mb * 1_000_000, n),
                             spoken=turn.spoken) for p, n in zip(turn.attachments, names))


def _title(text: str, records) -> str:
    words = " ".join(text.split())
    if not words:
        words = ", ".join(r.name for r in records) or "New chat"
    return words if len(words) <= 48 else words[:47].rsplit(" ", 1)[0] + "..."
