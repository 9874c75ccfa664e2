"""The turn loop: `Session.submit(turn) -> Iterator[Event]`.

One conversation. A turn: validate input and media -> transcribe speech
(audio attachments, or the user's live utterance) -> store the user turn ->
stream the answer (cancel checked every token) -> speak it sentence by
sentence while it is written, when asked -> store the answer (complete /
interrupted / error, with its audio) -> Done.
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from engine import media as media_mod
from engine import router
from engine.context import as_message
from engine.engine import Engine
from engine.errors import InputError, Unavailable
from engine.events import AudioChunk, CancelToken, Done, Error, Event, Notice, RouterStats, TextDelta
from engine.llm.base import Message
from engine.understand import understand, unreadable_note, user_message, with_facts
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


class Session:
    """One conversation. Created lazily in the store on the first turn."""

    def __init__(self, engine: Engine, conversation_id: str | None = None) -> None:
        self.engine = engine
        self.id = conversation_id
        if conversation_id and engine.store.get_conversation(conversation_id) is None:
            raise InputError(f"no conversation {conversation_id!r}")

    def history(self, before: int | None = None) -> list[Message]:
        """The stored turns as the LLM reads them (context.as_message; errors and empty
        answers left out); with `before`, only the turns stored before the turn of that id."""
        if not self.id:
            return []
        return [as_message(t) for t in self.engine.store.turns(self.id)
                if t.content and t.status != "error" and (before is None or t.id < before)]

    def submit(self, turn: Turn, cancel: CancelToken | None = None, gate: Gate | None = None) -> Iterator[Event]:
        """Run one turn. With a `gate`, the user turn is stored only once the gate opens
        (the answer is prepared meanwhile), and nothing is stored if it closes."""
        cancel = cancel or CancelToken()
        engine, store = self.engine, self.engine.store
        text = turn.text.strip()
        try:
            records = self._validate(turn, text)
        except InputError as exc:
            yield Error(str(exc), recoverable=True)
            yield Done(conversation_id=self.id or "")
            return
        got = yield from understand(engine, records, turn.spoken, cancel, text)
        heard = got.heard
        text = user_message(text, records, heard, turn.spoken)
        if turn.spoken and not text:
            yield Notice("I didn't catch any words in that.")
            yield Done(conversation_id=self.id or "")
            return
        history = self.history()
        stored = False

        def store_user() -> bool:
            """Store the user turn once it is certain (at once without a gate)."""
            nonlocal stored
            if not stored and (gate is None or gate.poll()):
                if self.id is None:
                    self.id = store.create_conversation()
                store.add_turn(self.id, "user", text, media=records,
                               meta={"transcripts": {r.name: heard[r.sha256] for r in records if r.sha256 in heard},
                                     **({"perception": got.facts, "overlays": got.overlays} if got.facts else {})})
                if not store.get_conversation(self.id)["title"]:
                    store.rename_conversation(self.id, _title(text, records))
                stored = True
            return stored

        earlier = router.conversation_media(store, self.id)
        store_user()

        speech = self._speech(turn, cancel)
        plan = None
        if text:
            try:
                plan = router.plan(engine, text, earlier, records, cancel)
            except RequestError as exc:
                plan = str(exc)
            if plan is not None and gate is not None and not gate.wait():
                yield Done(conversation_id=self.id or "", interrupted=True)  # the user went on speaking
                return
            store_user()
        if plan is not None:
            yield from self._tool_turn(plan, speech, cancel)
            return
        if speech is not None and not isinstance(speech, _Speaker):
            yield speech  # a Notice: not speaking, and why
            speech = None
        answer, usage, timings, errors = "", {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}, {}, []
        experts = None  # MoE models: which experts this answer used (the Experts panel reads it from the turn)
        prefix = unreadable_note(engine, records, got)
        if prefix:
            yield TextDelta(prefix)
            if speech:
                speech.push(prefix)
        if not text and not prefix:
            prefix = f"(I couldn't make out any words in {', '.join(r.name for r in records)}.)"
            yield TextDelta(prefix)
        if text:
            messages = [{"role": "system", "content": engine.config.system_prompt}, *history,
                        {"role": "user", "content": with_facts(text, got.facts)}]
            grounded = bool(got.facts) or (bool(got.heard) and not turn.spoken)  # facts or an attached transcript
            params = engine.params(turn.max_new_tokens, turn.temperature, facts=grounded)
            if isinstance(speech, _TalkerSpeaker):
                params = replace(params, trace=speech.trace)  # the talker speaks from the thinker's states
            stream = engine.answer(messages, params, cancel, records)
            while True:
                try:
                    event = next(stream)
                except StopIteration as stop:
                    answer, usage, timings = stop.value
                    break
                if isinstance(event, Error):
                    errors.append(event.message)
                elif isinstance(event, RouterStats):
                    experts = event.experts
                store_user()
                yield event
                if speech and isinstance(event, TextDelta):
                    speech.push(event.text)
                    yield from speech.ready()
        audio_rec = None
        if speech:
            yield from speech.finish()
        if gate is not None and not gate.wait():
            yield Done(usage, timings, True, self.id or "")  # the user went on: this answer never was
            return
        store_user()
        if speech:
            audio_rec = speech.store(engine)
        interrupted = cancel.cancelled
        status = "interrupted" if interrupted else ("error" if errors else "complete")
        meta = {"usage": usage, "timings": timings, **({"error": " ".join(errors)} if errors else {})}
        if speech:
            meta["speech"] = speech.timings()
        if experts:
            meta["router_stats"] = experts
        turn_id = store.add_turn(self.id, "assistant", prefix + answer, status=status,
                                 media=(audio_rec,) if audio_rec else (), meta=meta)
        yield Done(usage, timings, interrupted, self.id, turn_id)

    def _tool_turn(self, plan, speech, cancel: CancelToken) -> Iterator[Event]:
        """A turn that makes media: run the tool, say what was made, store it all."""
        from engine import toolrun

        if isinstance(plan, str):  # the request could not be planned (e.g. nothing to edit)
            answer, records, status = plan, [], "error"
        else:
            answer, records, status = yield from toolrun.run(self.engine, plan, cancel)
        yield TextDelta(answer)
        audio = ()
        if isinstance(speech, _Speaker) and not cancel.cancelled:
            speech.push(answer)
            yield from speech.finish()
            rec = speech.store(self.engine)
            audio = (rec,) if rec else ()
        meta = {"tool": {"name": plan.name, "arguments": plan.arguments, "chosen_by": plan.chosen_by}}\
            if not isinstance(plan, str) else {"error": plan}
        turn_id = self.engine.store.add_turn(self.id, "assistant", answer, status=status,
                                             media=(*records, *audio), meta=meta)
        yield Done({}, {}, cancel.cancelled, self.id, turn_id)

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

    def _speech(self, turn: Turn, cancel: CancelToken):
        if not turn.speak:
            return None
        try:
            tts = self.engine.roles["tts"].get()
        except Unavailable as exc:
            return Notice(f"Not speaking this answer: speech synthesis is {exc}")
        if tts.from_trace:  # the omni LLM's own talker (engine/speech/talker.py)
            return _TalkerSpeaker(tts, cancel, self.engine.model_lock)
        return _Speaker(tts, self.engine.config.tts, cancel)


class _Speaker:
    """Speaks the answer while it is written (engine/speech/tts.SpeechStream) and keeps the audio."""

    def __init__(self, tts, cfg, cancel: CancelToken) -> None:
        import time

        from engine.speech.tts import SpeechStream

        self.rate, self.started = tts.sample_rate, time.monotonic()
        self.stream = SpeechStream(tts, rate=cfg.rate, cancel=cancel, first_clause_chars=cfg.first_piece_chars)
        self.pcm: list[bytes] = []

    def push(self, text: str) -> None:
        self.stream.push(text)

    def _keep(self, chunks) -> Iterator[AudioChunk]:
        for chunk in chunks:
            self.pcm.append(chunk.pcm)
            yield chunk

    def ready(self) -> Iterator[AudioChunk]:
        return self._keep(self.stream.poll())

    def finish(self) -> Iterator[AudioChunk]:
        self.stream.close()
        return self._keep(self.stream.events())

    def timings(self) -> dict:
        first = self.stream.first_audio_at
        samples = sum(len(p) for p in self.pcm) // 2
        return {"first_audio_ms": round((first - self.started) * 1000, 1) if first else None,
                "audio_s": round(samples / self.rate, 3)}

    def store(self, engine: Engine):
        """The spoken answer as a WAV in the media store, so it can be replayed."""
        if not self.pcm:
            return None
        from engine.speech.audio import write_wav

        audio = np.frombuffer(b"".join(self.pcm), dtype="<i2").astype(np.float32) / 32767.0
        with tempfile.TemporaryDirectory() as tmp:
            path = write_wav(Path(tmp) / "answer.wav", audio, self.rate)
            return replace(media_mod.ingest(path, engine.media_dir, 1 << 31, "answer.wav"), spoken=True)


class _TalkerSpeaker(_Speaker):
    """The answer spoken by the omni model's talker, once the thinker has finished: it speaks
    from the thinker's hidden states (filled into `trace` during the answer), not from text."""

    def __init__(self, voice, cancel: CancelToken, lock) -> None:
        import time

        self.voice, self.cancel, self.lock = voice, cancel, lock
        self.rate, self.started, self.first = voice.sample_rate, time.monotonic(), None
        self.trace: list = []
        self.pcm: list[bytes] = []

    def push(self, text: str) -> None:
        pass  # (a tool turn's short reply has no trace: it is shown, not spoken)

    def ready(self) -> Iterator[AudioChunk]:
        return iter(())

    def finish(self) -> Iterator[AudioChunk]:
        import time

        if not self.trace or self.cancel.cancelled:
            return
        try:
            wav = self.voice.speak(self.trace[-1], self.cancel, self.lock)
        except Cancelled:
            return
        if len(wav):
            self.first = time.monotonic()
            pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()
            self.pcm.append(pcm)
            yield AudioChunk(pcm, self.rate)

    def timings(self) -> dict:
        samples = sum(len(p) for p in self.pcm) // 2
        return {"first_audio_ms": round((self.first - self.started) * 1000, 1) if self.first else None,
                "audio_s": round(samples / self.rate, 3), "voice": "talker"}


def _title(text: str, records) -> str:
    words = " ".join(text.split())
    if not words:
        words = ", ".join(r.name for r in records) or "New chat"
    return words if len(words) <= 48 else words[:47].rsplit(" ", 1)[0] + "..."
