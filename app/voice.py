"""Voice mode transport: one WebSocket per browser voice session.

Why a WebSocket of our own and not Gradio's streaming audio or fastrtc:
fastrtc 0.0.34 pins gradio<6, and Gradio's streaming components cut audio
into 0.5 s HTTP chunks each way, which both adds latency and leaves
seconds of answer audio buffered in the browser, so a barge-in could not
stop it at once. On localhost a WebSocket carrying raw PCM needs no
STUN/TURN, adds ~1 ms, and the server paces the answer audio
(engine/speech/voice.Pacer) so at most ~250 ms is ever queued client-side.

Protocol. Client -> server: first a JSON text frame
`{"type": "start", "sample_rate": 48000, "conversation_id": "..."}`, then
binary frames of mono int16 PCM at that rate, and optionally
`{"type": "stop"}`. Server -> client: JSON text frames (engine events:
voice_state, transcript, text_delta, notice, error, done) and binary frames
of answer audio: 4 bytes little-endian sample rate + mono int16 PCM.
"""
from __future__ import annotations

import asyncio
import json
import struct

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from engine.engine import Engine
from engine.errors import InputError, Unavailable
from engine.events import AudioChunk, Event

PUMP_S = 0.02


def make_voice_router(engine: Engine) -> APIRouter:
    router = APIRouter()

    @router.websocket("/voice/ws")
    async def voice(ws: WebSocket) -> None:
        from engine.voice_session import VoiceSession

        # Origin, Host and the token (when set: ?token=, or the page's login cookie) were checked
        # in app/security.Edge before this socket was accepted
        await ws.accept()
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()

        def send(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(outbox.put_nowait, event)
            except RuntimeError:
                pass  # the connection's loop is gone

        try:
            start = json.loads(await ws.receive_text())
            if not isinstance(start, dict):
                raise ValueError("the first message must be a JSON object: {\"type\": \"start\", ...}")
            rate = int(start.get("sample_rate") or 48000)
            if not 8000 <= rate <= 192000:
                raise ValueError(f"sample_rate {rate} is out of range")
            session = await asyncio.to_thread(VoiceSession, engine, send, start.get("conversation_id") or None)
        except WebSocketDisconnect:
            return  # gone before it said how to start: nothing to answer
        except (Unavailable, InputError, ValueError, KeyError, TypeError, RecursionError) as exc:
            why = f"{exc.why}" + (f"; {exc.what_to_set}" if exc.what_to_set else "") \
                if isinstance(exc, Unavailable) else str(exc)
            await ws.send_text(json.dumps({"type": "error", "message": f"Voice mode is unavailable: {why}",
                                           "recoverable": False}))
            await ws.close()
            return

        async def sender() -> None:
            while True:
                event = await outbox.get()
                if isinstance(event, AudioChunk):
                    await ws.send_bytes(struct.pack("<I", event.sample_rate) + event.pcm)
                else:
                    await ws.send_text(json.dumps(event.to_dict(), ensure_ascii=False))

        async def pumper() -> None:
            while True:
                await asyncio.sleep(PUMP_S)
                session.pump()

        tasks = [asyncio.create_task(sender()), asyncio.create_task(pumper())]
        try:
            while True:
                msg = await ws.receive()
                if msg.get("type") == "websocket.disconnect":
                    break
                if msg.get("bytes"):
                    await asyncio.to_thread(session.feed, msg["bytes"], rate)
                elif msg.get("text") and _is_stop(msg["text"]):
                    session.interrupt("stopped by the user")
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(session.close)

    return router


def _is_stop(text: str) -> bool:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "stop"
