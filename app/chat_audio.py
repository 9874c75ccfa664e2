"""Spoken chat completions: `modalities: ["text", "audio"]` answers aloud, `input_audio` is heard.

Called from app/api.py's chat route. The answer is spoken sentence by sentence while it
is written (engine/speech/tts.SpeechStream, as the voice mode speaks), encoded by
app/audio_out.Encoder, and sent as `delta.audio` chunks when streaming, or whole as
`message.audio` (OpenAI's shape: id, data, expires_at, transcript). An `input_audio`
part is transcribed by the ASR role and answered as a spoken question, as the CLI and
the page do (engine/understand.user_message).
"""
from __future__ import annotations

import base64
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from engine.errors import InputError

FORMATS = ("wav", "mp3", "flac", "opus", "aac", "pcm16")


class SpokenAnswer:
    """One answer's audio: text deltas in, encoded audio deltas out."""

    def __init__(self, engine, voice: str, fmt: str, cancel) -> None:
        from app.speech_roles import pick_voice
        from app.audio_out import Encoder

        self.engine, self.cancel = engine, cancel
        self.tts = pick_voice(engine, voice)
        self.encoder = Encoder("pcm" if fmt == "pcm16" else fmt, self.tts.sample_rate)
        self.id = f"audio_{uuid.uuid4().hex[:24]}"
        self.text: list[str] = []
        self._stream = None

    def _speech(self):
        if self._stream is None:
            from engine.speech.tts import SpeechStream

            cfg = self.engine.config.tts
            self._stream = SpeechStream(self.tts, rate=cfg.rate, cancel=self.cancel,
                                        first_clause_chars=cfg.first_piece_chars)
        return self._stream

    def _delta(self, chunks) -> Iterator[dict]:
        import numpy as np

        for chunk in chunks:
            data = self.encoder.feed(np.frombuffer(chunk.pcm, "<i2").astype(np.float32) / 32767.0)
            if data:
                yield {"audio": {"id": self.id, "data": base64.b64encode(data).decode()}}

    def push(self, text: str) -> list[dict]:
        """A text delta: speak it; the audio deltas ready now (without waiting)."""
        if not text:
            return []
        self.text.append(text)
        speech = self._speech()
        speech.push(text)
        return list(self._delta(speech.poll()))

    def rest(self) -> Iterator[dict]:
        """After the last text: the remaining audio deltas as they are made (blocking: run in a thread)."""
        speech = self._speech()
        speech.close()
        yield from self._delta(speech.events())
        tail = self.encoder.close()
        last = {"id": self.id, "expires_at": int(time.time()) + 3600, "transcript": ""}
        if tail:
            last["data"] = base64.b64encode(tail).decode()
        yield {"audio": last}

    def whole(self, text: str) -> dict:
        """The whole answer's audio, for a non-streamed response's message.audio (blocking). Its own
        cancel token: the request's was set when the answer's event stream ended."""
        from engine.events import CancelToken

        self.cancel = CancelToken()
        data = b"".join(base64.b64decode(d["audio"].get("data", "")) for d in [*self.push(text), *self.rest()])
        return {"id": self.id, "data": base64.b64encode(data).decode(), "expires_at": int(time.time()) + 3600,
                "transcript": text}


def requested(engine, body, cancel) -> SpokenAnswer | None:
    """The spoken answer a request (app/bodies.ChatRequest) asks for, or None. ValueError (a 400)
    for a bad request; Unavailable when speech synthesis is off."""
    if body.modalities is None:
        return None
    if not body.modalities:
        raise ValueError("modalities must be ['text'] or ['text', 'audio']")
    if "audio" not in body.modalities:
        return None
    if body.audio is None:
        raise ValueError("modalities with 'audio' needs audio: {'voice': ..., 'format': ...}")
    fmt = body.audio.format.lower()
    if fmt not in FORMATS:
        raise ValueError(f"audio.format {fmt[:20]!r}: choose one of {', '.join(FORMATS)}")
    return SpokenAnswer(engine, body.audio.voice, fmt, cancel)


def hear(engine, messages: list[dict], media: list) -> tuple[list, bool]:
    """Transcribe the inline `input_audio` parts into their messages (a part alone is the question;
    beside typed text it is added as '[audio-0.wav, transcribed: ...]'). Returns the media left
    for the perception adapters, and whether a transcript joined typed text (grounded decoding).
    With speech recognition unavailable, the audio is left to the perceiver, which says so."""
    from app.speech_roles import decode_16k
    from engine import media as media_mod
    from engine.perception.base import public_message
    from engine.errors import Unavailable

    audio = [m for m in media if m[1].startswith("audio-")]
    if not audio:
        return media, False
    try:
        asr = engine.roles["asr"].get()
    except Unavailable:
        return media, False
    grounded = False
    with tempfile.TemporaryDirectory(prefix="omni-api-audio-") as tmp:
        for n, (i, name, data) in enumerate(audio):
            path = Path(tmp) / f"part-{n}"
            path.write_bytes(data)
            try:
                record = media_mod.ingest(path, Path(tmp) / "media", engine.config.max_upload_mb * 1_000_000, name)
                if record.kind != "audio":
                    raise InputError(f"{name} is {record.kind}, not audio")
                said = asr.transcribe(decode_16k(Path(record.path), name=name)).text  # InputError if it breaks mid-file
            except InputError as exc:
                text = public_message(str(exc), path, name)
                raise InputError(text if name in text else f"{name}: {text}") from None
            typed = messages[i]["content"]
            if not said:
                messages[i]["content"] = typed + ("\n\n" if typed else "") + f"({name}: no words were heard in it)"
            elif typed:
                messages[i]["content"] = f"{typed}\n\n[{name}, transcribed: {said}]"
                grounded = True
            else:
                messages[i]["content"] = said
    return [m for m in media if m not in audio], grounded
