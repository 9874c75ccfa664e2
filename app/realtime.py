"""Realtime voice at `/v1/realtime`: OpenAI's Realtime event protocol over the browser's VoiceSession.

One voice engine, two transports: app/voice.py speaks the page's own little protocol;
this module speaks OpenAI's (the beta event names: `response.audio.delta`, ...), so
`client.beta.realtime.connect(...)` and other Realtime clients drive the same
engine/speech/voice.VoiceSession (server VAD, endpointing, paced answer audio,
barge-in with the echo guard). Audio is PCM16 mono at 24 kHz both ways, as the
protocol says; the session resamples inside.

The connection state lives in `Connection` (app/realtime_events.py turns engine
events into protocol events). With `turn_detection: null` the client commits the
audio buffer itself and asks for each response: those turns, and text items, run
through the same conversation's Session.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import tempfile
import threading
from pathlib import Path

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from app.realtime_events import Protocol
from app.realtime_session import Instructed, modalities_of, vad_settings
from engine.errors import InputError, Unavailable, refuse_lone_surrogates
from engine.events import CancelToken, Event

RATE = 24_000
MAX_BUFFER_S = 5 * 60  # a manual (turn_detection: null) buffer longer than this is refused
MAX_UTTERANCE_S = 120  # server VAD: speech going on longer than this is ended (committed) there
MAX_TEXT_CHARS = 20_000
PUMP_S = 0.02
log = logging.getLogger(__name__)
ITEM_TYPES = ("message", "function_call_output")  # conversation.item.create items (tests/doors.py: a row each)
TEXT_PARTS = ("input_text", "text")  # a message item's content parts (audio: append and commit)


class Connection:
    """One realtime client: the protocol state, the engine side, and what the client asked for."""

    def __init__(self, engine, ws: WebSocket) -> None:
        from engine.session import Session

        self.engine, self.ws = engine, ws
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.proto = Protocol(engine.config)
        self.view = Instructed(engine)
        self.session = Session(self.view)  # text items and manual commits before any live audio
        self.voice = None  # the VoiceSession, made on the first audio in server-VAD mode
        self.buffer = bytearray()  # manual mode: audio appended since the last commit
        self.pending: list = []  # manual mode: committed audio and text items not yet answered
        self.turn: CancelToken | None = None  # a client-started response running now
        self.turn_lock = threading.Lock()

    # --- engine -> client ---

    def post(self, item) -> None:
        """From any thread: an engine event (or a marker) for the sender task."""
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:
            pass  # the connection's loop is gone

    async def send(self, event: dict) -> None:
        await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def sender(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, Event):
                events = self.proto.engine_event(item)
            else:
                events = self.proto.marker(*item)
                if item[0] == "turn_end":
                    self.turn = None
            for event in events:
                await self.send(event)

    async def pumper(self) -> None:
        while True:
            await asyncio.sleep(PUMP_S)
            if self.voice is not None:
                self.voice.pump()

    # --- client -> engine ---

    async def handle(self, text: str) -> None:
        try:
            event = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return await self.send(self.proto.error(f"the message is not valid JSON ({str(exc)[:80]})", "invalid_json"))
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return await self.send(self.proto.error("each message must be a JSON object with a 'type'", "invalid_event"))
        try:
            refuse_lone_surrogates(text, event, "the event")
        except InputError as exc:
            return await self.send(self.proto.error(str(exc), "invalid_value"))
        kind, event_id = event["type"], event.get("event_id")
        handler = HANDLERS.get(kind)
        if handler is None:
            return await self.send(self.proto.error(f"unsupported event type {kind[:60]!r}; this server handles "
                                                    f"{', '.join(HANDLERS)}", "unsupported_event", event_id))
        try:
            await handler(self, event)
        except (ValueError, TypeError, InputError) as exc:
            await self.send(self.proto.error(str(exc), "invalid_value", event_id))
        except Unavailable as exc:
            await self.send(self.proto.error(f"{exc.why}; {exc.what_to_set}", "unavailable", event_id, "server_error"))

    async def session_update(self, event: dict) -> None:
        from app.speech_roles import OPENAI_VOICES, pick_voice, voices

        s = event.get("session")
        if not isinstance(s, dict):
            raise ValueError("session.update needs a 'session' object")
        if "voice" in s:
            if s["voice"] not in voices(self.engine):
                raise ValueError(f"unknown voice {str(s['voice'])[:40]!r}; choose one of {', '.join(voices(self.engine))}")
            own = s["voice"] not in OPENAI_VOICES and s["voice"] != self.engine.config.tts.voice
            self.view.tts = await asyncio.to_thread(pick_voice, self.engine, s["voice"]) if own else None
        for key in ("input_audio_format", "output_audio_format"):
            if s.get(key, "pcm16") != "pcm16":
                raise ValueError(f"{key} {str(s[key])[:20]!r}: this server speaks pcm16 (24 kHz mono) only")
        if "instructions" in s:
            if not isinstance(s["instructions"], str) or len(s["instructions"]) > MAX_TEXT_CHARS:
                raise ValueError(f"instructions must be a string of at most {MAX_TEXT_CHARS:,} characters")
            self.view.instructions = s["instructions"]
        if "modalities" in s:
            self.proto.modalities = modalities_of(s["modalities"])
        if "turn_detection" in s:
            td = s["turn_detection"]
            if td is not None and (not isinstance(td, dict) or td.get("type", "server_vad") != "server_vad"):
                raise ValueError("turn_detection: use {'type': 'server_vad', ...} or null (commit yourself)")
            if self.voice is not None and (td is None) != (self.proto.session["turn_detection"] is None):
                raise ValueError("turn detection can be switched only before the first audio is appended")
            self.view.vad = vad_settings(td or {})
            self.proto.session["turn_detection"] = None if td is None else {"type": "server_vad", **(td or {})}
        if "tools" in s or "tool_choice" in s:
            await asyncio.to_thread(self._tools, s)
        for key in ("voice", "instructions"):
            if key in s:
                self.proto.session[key] = s[key]
        await self.send(self.proto.event("session.updated", session=self.proto.session))

    def _tools(self, s: dict) -> None:
        """session.update's `tools` and `tool_choice`: checked as the chat API checks them."""
        from pydantic import ValidationError

        from app.api_params import chat_params
        from app.bodies import ChatRequest, where

        tools = s.get("tools", self.proto.session["tools"])
        choice = s.get("tool_choice", self.proto.session["tool_choice"])
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of {'type': 'function', 'name', 'description', 'parameters'}")
        as_chat = [{"type": t.get("type"), "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name", "")}}
        try:
            body = ChatRequest.model_validate({"messages": [{"role": "user", "content": "-"}], "tools": as_chat or None,
                                               "tool_choice": choice if as_chat or choice == "none" else None})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{where(first['loc'])}: {first['msg'].removeprefix('Value error, ')}") from None
        params = chat_params(self.engine, body)
        self.view.tools, self.view.tool_choice = params.tools, params.tool_choice
        self.proto.session.update(tools=tools, tool_choice=s.get("tool_choice", self.proto.session["tool_choice"]))

    async def append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ValueError("input_audio_buffer.append needs 'audio': base64 PCM16 at 24 kHz")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'audio' is not valid base64") from None
        pcm = pcm[: len(pcm) // 2 * 2]
        self.proto.fed_ms += len(pcm) / 2 / RATE * 1000
        if self.proto.session["turn_detection"] is None:
            if len(self.buffer) + len(pcm) > MAX_BUFFER_S * RATE * 2:
                raise ValueError(f"the input audio buffer is full ({MAX_BUFFER_S // 60} minutes): commit or clear it")
            self.buffer += pcm
            return
        if self.voice is None:
            await self.start_voice()
        await asyncio.to_thread(self.voice.feed, pcm, RATE)
        heard_from = self.proto.speech_from_ms
        if heard_from is not None and self.proto.fed_ms - heard_from > MAX_UTTERANCE_S * 1000:
            self.proto.speech_from_ms = None
            await self.commit({})  # one utterance is held in memory until it ends: end it here

    async def start_voice(self) -> None:
        from engine.voice_session import VoiceSession

        self.voice = await asyncio.to_thread(VoiceSession, self.view, self.post, self.session.id)

    async def commit(self, event: dict) -> None:
        if self.proto.session["turn_detection"] is not None:
            if self.voice is not None:  # end the utterance now: the silence the VAD waits for
                silence = bytes(int(RATE * (self.view.config.vad.end_silence_ms + 100) / 1000) * 2)
                await asyncio.to_thread(self.voice.feed, silence, RATE)
            return
        if len(self.buffer) < RATE * 2 // 10:
            raise ValueError("the input audio buffer holds less than 100 ms of audio; append more before committing")
        item = self.proto.new_user_item("input_audio")
        self.pending.append(("audio", bytes(self.buffer), item))
        self.buffer.clear()
        for out in self.proto.committed(item):
            await self.send(out)

    async def clear(self, event: dict) -> None:
        self.buffer.clear()
        await self.send(self.proto.event("input_audio_buffer.cleared"))

    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") not in ITEM_TYPES:
            raise ValueError(f"conversation.item.create takes an item of type {' or '.join(ITEM_TYPES)}")
        if item.get("type") == "function_call_output":
            return await self.function_output(item)
        if item.get("role", "user") != "user":
            raise ValueError("conversation.item.create takes a user message item or a function_call_output")
        parts = item.get("content")
        texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") in TEXT_PARTS] \
            if isinstance(parts, list) else []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("the item needs content [{'type': 'input_text', 'text': '...'}] (audio: append and commit)")
        text = "\n".join(texts).strip()
        if not text or len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"the item's text must be 1-{MAX_TEXT_CHARS:,} characters")
        created = self.proto.new_user_item("input_text", text, item.get("id"))
        self.pending.append(("text", text, created))
        await self.send(self.proto.event("conversation.item.created", previous_item_id=None, item=created))

    async def function_output(self, item: dict) -> None:
        """A function's result: read by the model as the next turn (then `response.create`)."""
        from engine.llm.tool_calls import result_text

        output = item.get("output")
        if not isinstance(output, str) or len(output) > MAX_TEXT_CHARS:
            raise ValueError(f"a function_call_output needs 'output': a string of at most {MAX_TEXT_CHARS:,} characters")
        created = {"id": item.get("id") if isinstance(item.get("id"), str) else self.proto.new_user_item("input_text")["id"],
                   "object": "realtime.item", "type": "function_call_output", "status": "completed",
                   "call_id": str(item.get("call_id", ""))[:64], "output": output}
        self.pending.append(("text", result_text(output), created))
        await self.send(self.proto.event("conversation.item.created", previous_item_id=None, item=created))

    async def response_create(self, event: dict) -> None:
        options = event.get("response") if isinstance(event.get("response"), dict) else {}
        if self.turn is not None or self.proto.response is not None or self.proto.turn_open:
            raise ValueError("conversation_already_has_active_response: cancel it or wait for response.done")
        if not self.pending:
            raise ValueError("nothing to answer: create a conversation item or commit audio first")
        modalities = modalities_of(options["modalities"]) if "modalities" in options else self.proto.modalities
        pending, self.pending = self.pending, []
        self.turn = CancelToken()
        for out in self.proto.begin(modalities, direct=True):
            await self.send(out)
        threading.Thread(target=self._run_turn, args=(pending, modalities, self.turn), daemon=True,
                         name="realtime-turn").start()

    def _run_turn(self, pending: list, modalities: list[str], cancel: CancelToken) -> None:
        """A client-started response: committed audio and text items as one user turn."""
        import numpy as np

        from engine.session import Turn
        from engine.speech.audio import write_wav

        session = self.voice.session if self.voice is not None else self.session
        texts = [p[1] for p in pending if p[0] == "text"]
        audio = [p[1] for p in pending if p[0] == "audio"]
        try:
            with self.turn_lock, tempfile.TemporaryDirectory(prefix="omni-rt-") as tmp:
                files = []
                for i, pcm in enumerate(audio):
                    x = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0
                    files.append(str(write_wav(Path(tmp) / f"in-{i}.wav", x, RATE)))
                turn = Turn("\n".join(texts), tuple(files), ("voice message.wav",) * len(files),
                            spoken=bool(files), speak="audio" in modalities)
                for ev in session.submit(turn, cancel):
                    self.post(ev)
        except Exception:  # noqa: BLE001 - reported to the client as a failed response, detail in the log
            log.exception("a realtime turn failed")
            self.post(("failed",))
        finally:
            self.post(("turn_end", cancel.cancelled))

    async def response_cancel(self, event: dict) -> None:
        if self.turn is not None:
            self.turn.cancel("cancelled by the client")
        elif self.voice is not None and self.proto.response is not None:
            self.proto.cancelling = True
            self.voice.interrupt("cancelled by the client")
        else:
            raise ValueError("there is no response to cancel")

    async def truncate(self, event: dict) -> None:
        await self.send(self.proto.event("conversation.item.truncated", item_id=event.get("item_id"),
                                         content_index=event.get("content_index", 0),
                                         audio_end_ms=event.get("audio_end_ms", 0)))

    async def close(self) -> None:
        if self.turn is not None:
            self.turn.cancel("client disconnected")
        if self.voice is not None:
            await asyncio.to_thread(self.voice.close)


HANDLERS = {"session.update": Connection.session_update, "input_audio_buffer.append": Connection.append,
            "input_audio_buffer.commit": Connection.commit, "input_audio_buffer.clear": Connection.clear,
            "conversation.item.create": Connection.item_create, "response.create": Connection.response_create,
            "response.cancel": Connection.response_cancel, "conversation.item.truncate": Connection.truncate}


def make_realtime_router(engine) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/realtime", status_code=426, tags=["realtime"])
    def realtime_docs() -> dict:
        """Realtime voice is a WebSocket (ws://HOST/v1/realtime, bearer token or ?token=): OpenAI's
        Realtime events, PCM16 mono at 24 kHz. Client: session.update, input_audio_buffer.append /
        commit / clear, conversation.item.create (text), response.create / cancel. Server:
        session.created / updated, input_audio_buffer.speech_started / speech_stopped / committed,
        conversation.item.input_audio_transcription.completed, response.created, response.text.delta,
        response.audio.delta, response.audio_transcript.delta, response.done, error."""
        return {"error": {"message": "connect with a WebSocket: client.beta.realtime.connect(model=...)",
                          "type": "invalid_request_error", "code": 426}}

    @router.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        # Origin, Host and the token (Authorization: Bearer, or ?token=) were checked in
        # app/security.Edge before this socket was accepted
        await ws.accept()
        conn = Connection(engine, ws)
        try:
            for role in ("vad", "asr", "tts", "llm"):
                await asyncio.to_thread(engine.roles[role].get)
        except Unavailable as exc:
            await conn.send(conn.proto.error(f"realtime voice is unavailable: {exc.why}; {exc.what_to_set}",
                                             "unavailable", kind="server_error"))
            await ws.close(code=1011)
            return
        await conn.send(conn.proto.event("session.created", session=conn.proto.session))
        tasks = [asyncio.create_task(conn.sender()), asyncio.create_task(conn.pumper())]
        try:
            while True:
                msg = await ws.receive()
                if msg.get("type") == "websocket.disconnect":
                    break
                if msg.get("text") is not None:
                    await conn.handle(msg["text"])
                else:
                    await conn.send(conn.proto.error("send JSON text frames (audio goes base64 in "
                                                     "input_audio_buffer.append)", "invalid_event"))
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await conn.close()

    return router
