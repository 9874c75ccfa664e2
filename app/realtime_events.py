"""Engine events -> OpenAI Realtime server events, for one connection (app/realtime.py).

No I/O and no threads: `Protocol` keeps the state the protocol needs (the user item
being heard, the response being written, what to skip after a barge-in) and returns
the events to send, so its mapping reads and tests on its own.

    VoiceState hearing      -> input_audio_buffer.speech_started
    VoiceState thinking     -> speech_stopped, committed, conversation.item.created
    Transcript              -> conversation.item.input_audio_transcription.completed
    TextDelta               -> response.audio_transcript.delta (or response.text.delta, text only)
    ToolCallDelta           -> a function_call item: output_item.added, function_call_arguments.delta
                               (.done and output_item.done when the response ends)
    AudioChunk              -> response.audio.delta (PCM16 at 24 kHz, base64)
    VoiceState listening    -> response.done (completed: the answer's audio has all been sent)
    VoiceState interrupted  -> response.done (cancelled, turn_detected) and speech_started
"""
from __future__ import annotations

import base64
import uuid

import numpy as np

from engine.events import AudioChunk, Done, Error, Event, TextDelta, ToolCallDelta, Transcript, VoiceState

RATE = 24_000


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Protocol:
    def __init__(self, config) -> None:
        vad = config.vad
        self.modalities = ["text", "audio"]
        self.session = {
            "id": new_id("sess"), "object": "realtime.session", "model": config.llm.model,
            "modalities": self.modalities, "instructions": config.system_prompt, "voice": config.tts.voice,
            "input_audio_format": "pcm16", "output_audio_format": "pcm16",
            "input_audio_transcription": {"model": config.asr.model},
            "turn_detection": {"type": "server_vad", "threshold": vad.threshold, "prefix_padding_ms": 300,
                               "silence_duration_ms": vad.end_silence_ms, "create_response": True},
            "tools": [], "tool_choice": "none", "temperature": config.llm.temperature,
            "max_response_output_tokens": config.llm.max_new_tokens}
        self.fed_ms = 0.0  # input audio received so far (the protocol's audio clock)
        self.speech_from_ms: float | None = None  # where the utterance being heard started
        self.user_item: str | None = None  # the user item being heard / last committed
        self.response: dict | None = None  # the response being written
        self.skip = False  # after a barge-in: the cancelled turn's last events until its Done
        self.turn_open = False  # the engine is still writing the current answer
        self.cancelling = False  # the client asked for the cancel (not a barge-in)
        self._usage: dict = {}

    # --- building blocks ---

    def event(self, kind: str, **fields) -> dict:
        return {"type": kind, "event_id": new_id("event"), **fields}

    def error(self, message: str, code: str, event_id: str | None = None, kind: str = "invalid_request_error") -> dict:
        return self.event("error", error={"type": kind, "code": code, "message": message, "param": None,
                                          "event_id": event_id})

    def new_user_item(self, content_type: str, text: str | None = None, item_id: str | None = None) -> dict:
        self.user_item = item_id if isinstance(item_id, str) and 0 < len(item_id) <= 64 else new_id("item")
        part = {"type": content_type, "transcript": None} if content_type == "input_audio" else \
            {"type": content_type, "text": text}
        return {"id": self.user_item, "object": "realtime.item", "type": "message", "status": "completed",
                "role": "user", "content": [part]}

    def committed(self, item: dict) -> list[dict]:
        return [self.event("input_audio_buffer.committed", previous_item_id=None, item_id=item["id"]),
                self.event("conversation.item.created", previous_item_id=None, item=item)]

    # --- a response ---

    def begin(self, modalities: list[str], direct: bool) -> list[dict]:
        """response.created, output_item.added, content_part.added."""
        audio = "audio" in modalities
        item = {"id": new_id("item"), "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        self.response = {"id": new_id("resp"), "modalities": modalities, "direct": direct, "item": item,
                         "text": [], "resampler": None, "audio_bytes": 0, "calls": {}}
        self._usage = {}
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        rid = self.response["id"]
        return [self.event("response.created", response=self._shape("in_progress")),
                self.event("response.output_item.added", response_id=rid, output_index=0, item=item),
                self.event("response.content_part.added", response_id=rid, item_id=item["id"], output_index=0,
                           content_index=0, part=part)]

    def _shape(self, status: str, details: dict | None = None) -> dict:
        r = self.response
        usage = None
        if status != "in_progress":
            p, c = self._usage.get("prompt_tokens", 0), self._usage.get("completion_tokens", 0)
            usage = {"total_tokens": p + c, "input_tokens": p, "output_tokens": c}
        output = [] if status == "in_progress" else [r["item"], *(c for _, c in sorted(r["calls"].items()))]
        return {"id": r["id"], "object": "realtime.response", "status": status, "status_details": details,
                "output": output, "modalities": r["modalities"], "usage": usage}

    def _where(self) -> dict:
        r = self.response
        return {"response_id": r["id"], "item_id": r["item"]["id"], "output_index": 0, "content_index": 0}

    def finish(self, status: str, reason: str | None = None) -> list[dict]:
        """The response's closing events; `status` completed | cancelled | failed."""
        r = self.response
        if r is None:
            return []
        out = self._audio(np.zeros(0, np.float32), last=True)
        text, where = "".join(r["text"]), self._where()
        audio = "audio" in r["modalities"]
        if audio:
            out += [self.event("response.audio.done", **where),
                    self.event("response.audio_transcript.done", **where, transcript=text)]
            part = {"type": "audio", "transcript": text}
        else:
            out.append(self.event("response.text.done", **where, text=text))
            part = {"type": "text", "text": text}
        item = r["item"]
        item.update(status="completed" if status == "completed" else "incomplete", content=[part])
        details = {"type": status, "reason": reason} if reason else None
        out += [self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", response_id=r["id"], output_index=0, item=item)]
        for index, call in sorted(r["calls"].items()):
            call["status"] = "completed"
            out += [self.event("response.function_call_arguments.done", response_id=r["id"], item_id=call["id"],
                               output_index=index + 1, call_id=call["call_id"], name=call["name"],
                               arguments=call["arguments"]),
                    self.event("response.output_item.done", response_id=r["id"], output_index=index + 1, item=call)]
        out.append(self.event("response.done", response=self._shape(status, details)))
        self.response = None
        return out

    def _audio(self, x: np.ndarray, rate: int = 0, last: bool = False) -> list[dict]:
        from engine.speech.audio import StreamResampler, to_int16

        r = self.response
        if r is None or "audio" not in r["modalities"]:
            return []
        if r["resampler"] is None:
            if last:
                return []
            r["resampler"] = StreamResampler(rate, RATE)
        pcm = to_int16(r["resampler"](x, last=last)).tobytes()
        if not pcm:
            return []
        r["audio_bytes"] += len(pcm)
        return [self.event("response.audio.delta", **self._where(), delta=base64.b64encode(pcm).decode())]

    # --- engine events ---

    def engine_event(self, ev: Event) -> list[dict]:
        if isinstance(ev, VoiceState):
            return self._state(ev.state, ev.reason)
        if isinstance(ev, Transcript):
            return [self.event("conversation.item.input_audio_transcription.completed", item_id=self.user_item,
                               content_index=0, transcript=ev.text)]
        if isinstance(ev, Done):
            self._usage, self.turn_open = dict(ev.usage or {}), False
            self.skip = False
            return []
        if self.skip:
            return []
        if isinstance(ev, Error):
            return [self.error(ev.message, "engine_error", kind="server_error")]
        if not isinstance(ev, (TextDelta, AudioChunk, ToolCallDelta)):
            return []  # notices, perception, progress: nothing in the protocol for them
        self.turn_open = True
        out = [] if self.response is not None else self.begin(self.modalities, direct=False)
        if isinstance(ev, ToolCallDelta):
            return out + self._call(ev)
        if isinstance(ev, AudioChunk):
            x = np.frombuffer(ev.pcm, "<i2").astype(np.float32) / 32767.0
            return out + self._audio(x, ev.sample_rate)
        self.response["text"].append(ev.text)
        kind = "response.audio_transcript.delta" if "audio" in self.response["modalities"] else "response.text.delta"
        return out + [self.event(kind, **self._where(), delta=ev.text)]

    def _call(self, ev: ToolCallDelta) -> list[dict]:
        r = self.response
        if ev.name:
            call = {"id": new_id("item"), "object": "realtime.item", "type": "function_call", "status": "in_progress",
                    "name": ev.name, "call_id": new_id("call"), "arguments": ""}
            r["calls"][ev.index] = call
            return [self.event("response.output_item.added", response_id=r["id"], output_index=ev.index + 1, item=call)]
        call = r["calls"][ev.index]
        call["arguments"] += ev.arguments
        return [self.event("response.function_call_arguments.delta", response_id=r["id"], item_id=call["id"],
                           output_index=ev.index + 1, call_id=call["call_id"], delta=ev.arguments)]

    def _state(self, state: str, reason: str) -> list[dict]:
        if state == "hearing":
            return self._speech_started()
        if state == "thinking":  # the utterance ended: its turn starts
            self.speech_from_ms = None
            self.turn_open = True
            item = self.new_user_item("input_audio")
            return [self.event("input_audio_buffer.speech_stopped", audio_end_ms=int(self.fed_ms), item_id=item["id"]),
                    *self.committed(item)]
        if state == "listening" and self.response is not None and not self.response["direct"]:
            return self.finish("completed")
        if state == "interrupted":
            by_client, self.cancelling = self.cancelling, False
            out = self.finish("cancelled", "client_cancelled" if by_client else "turn_detected")
            self.skip = self.turn_open
            return out if by_client or reason == "voice mode closed" else out + self._speech_started()
        return []

    def _speech_started(self) -> list[dict]:
        self.speech_from_ms = self.fed_ms
        self.user_item = new_id("item")
        return [self.event("input_audio_buffer.speech_started", audio_start_ms=int(self.fed_ms),
                           item_id=self.user_item)]

    def marker(self, kind: str, *args) -> list[dict]:
        """The end of a client-started response: ("turn_end", cancelled) or ("failed",)."""
        if kind == "failed":
            return self.finish("failed")
        return self.finish("cancelled" if args and args[0] else "completed",
                           "client_cancelled" if args and args[0] else None)
