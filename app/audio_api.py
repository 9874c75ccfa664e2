"""OpenAI audio endpoints on the app's server, over the engine's own ASR and TTS roles.

`POST /v1/audio/transcriptions` and `/v1/audio/translations` (multipart `file`,
the same sniffing and limits as an attachment, decoded block by block to 16 kHz so a
long file never sits in memory at its own rate) and `POST /v1/audio/speech` (JSON;
the audio is encoded and sent sentence by sentence while the rest is synthesized,
app/audio_out.py). The bearer token, Host/Origin checks and body limits were applied
in app/security.Edge before a route here reads a byte.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.bodies import error, invalid
from app.speech_roles import decode_16k, pick_voice, voices
from engine.errors import InputError, Unavailable
from engine.events import CancelToken, Error
from engine.speech.decode import ACCEPTED as AUDIO_ACCEPTED

MAX_SPEECH_CHARS = 4096  # as OpenAI's /audio/speech
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
                  "pt": "portuguese", "nl": "dutch", "ru": "russian", "zh": "chinese", "ja": "japanese"}


class TranscriptionForm(BaseModel):
    """The multipart fields of /v1/audio/transcriptions (and /translations, without language)."""

    model_config = ConfigDict(extra="ignore")
    file: bytes = Field(b"", description=f"the audio file ({AUDIO_ACCEPTED})")
    model: str = Field("whisper-1", description="accepted and ignored: the server's --asr model answers")
    language: str | None = Field(None, max_length=20, description="ISO-639-1 code; skips detection")
    prompt: str | None = Field(None, max_length=4000, description="accepted; Whisper here is not prompted")
    response_format: str = Field("json", description="json | text | srt | verbose_json | vtt")
    temperature: float = Field(0.0, ge=0.0, le=1.0, description="accepted; decoding here is greedy")
    timestamp_granularities: list[Literal["segment", "word"]] = Field(
        default_factory=lambda: ["segment"], description="segment (word timestamps are not available)")


class SpeechRequest(BaseModel):
    """The JSON body of /v1/audio/speech."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field("tts-1", description="accepted and ignored: the server's voice model answers")
    input: str = Field(..., description=f"the text to speak, 1-{MAX_SPEECH_CHARS} characters")
    voice: str = Field("", description="a voice from /v1/audio/voices; OpenAI's names speak in the default voice")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="speaking rate (Piper honours 0.5-2.0)")
    response_format: str = Field("mp3", description="mp3 | opus | aac | flac | wav | pcm (24 kHz s16le)")
    instructions: str | None = Field(None, max_length=4096, description="accepted; Piper voices are not steerable")
    stream_format: Literal["audio"] = Field("audio", description="audio (the bytes, streamed)")


def _unavailable(role: str, exc: Unavailable) -> JSONResponse:
    how = f"; {exc.what_to_set}" if exc.what_to_set else ""
    return error(503, f"{role} is unavailable: {exc.why}{how}", "server_error")


def _schema(model: type[BaseModel], media_type: str) -> dict:
    schema = model.model_json_schema()
    if media_type.startswith("multipart"):
        schema["properties"]["file"] = {"type": "string", "format": "binary"}
        schema["required"] = ["file"]
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


# --- reading an upload ---------------------------------------------------------------

async def _upload_audio(engine, upload) -> tuple[np.ndarray, str]:
    """The multipart file -> (16 kHz audio, the name to show). Sniffed and limited as an attachment
    (engine.media.ingest, into a throwaway media dir: nothing the API hears is kept)."""
    from app.images_api import shown_name
    from engine import media as media_mod

    name = shown_name(upload.filename, 80)
    limit = engine.config.max_upload_mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="omni-audio-") as tmp:
        src, size = Path(tmp) / "upload", 0
        with open(src, "wb") as out:  # the client's file name is shown, never used as a path
            while block := await upload.read(1 << 20):
                size += len(block)
                if size > limit:
                    raise InputError(f"{name} is over the upload limit of {limit / 1e6:.0f} MB")
                out.write(block)
        if size == 0:
            raise InputError(f"{name} is empty")

        def check_and_decode() -> np.ndarray:
            record = media_mod.ingest(src, Path(tmp) / "media", limit, name)
            if record.kind != "audio":
                raise InputError(f"{name} is {record.kind}, not audio: send {AUDIO_ACCEPTED}")
            return decode_16k(Path(record.path), name=name)  # InputError (naming `name`) when it breaks mid-file

        return await asyncio.to_thread(check_and_decode), name


# --- transcripts in OpenAI's shapes ------------------------------------------------------

def _clock(t: float, sep: str) -> str:
    ms = int(round(max(t, 0.0) * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def subtitles(segments, fmt: str) -> str:
    """srt or vtt from (start, end, text) segments."""
    if fmt == "srt":
        return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
                       for i, s in enumerate(segments, 1))
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n" for s in segments)


def transcript_response(result, fmt: str, task: str):
    """A Transcript (engine.speech.asr) as the response OpenAI's clients parse."""
    if fmt == "text":
        return PlainTextResponse(result.text + "\n" if result.text else "")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(subtitles(result.segments, fmt), media_type="text/plain" if fmt == "srt" else "text/vtt")
    if fmt == "json":
        return {"text": result.text}
    return {"task": task, "language": _language_name(result.language), "duration": round(result.duration_s, 3),
            "text": result.text,
            "segments": [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [],
                          "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
                         for i, s in enumerate(result.segments)]}


def _language_name(code: str) -> str:
    """OpenAI's verbose_json names the language ("english"); Whisper gives the code."""
    return LANGUAGE_NAMES.get(code, code)


def translate(asr, audio: np.ndarray):
    """Whisper's own translate task (speech in any language -> English text), where the model can."""
    from engine.speech.asr import FasterWhisperASR, OpenAIWhisperASR, Segment, Transcript

    duration = len(audio) / 16000
    if isinstance(asr, FasterWhisperASR):
        segments, info = asr.model.transcribe(audio, task="translate", beam_size=1, vad_filter=False)
        found, language = [Segment(s.start, s.end, s.text.strip()) for s in segments], info.language
    elif isinstance(asr, OpenAIWhisperASR):
        out = asr.model.transcribe(audio, task="translate", fp16=False, verbose=None)
        found = [Segment(s["start"], s["end"], s["text"].strip()) for s in out["segments"]]
        language = out.get("language", "")
    else:
        raise Unavailable(f"{asr.name} cannot translate", "use a Whisper model")
    found = [s for s in found if s.text]
    return Transcript(" ".join(s.text for s in found), language, tuple(found), duration)


# --- speech ----------------------------------------------------------------------------

def speech_chunks(tts, text: str, speed: float, cancel: CancelToken):
    """float32 blocks at tts.sample_rate, one per sentence, stopping at the cancel."""
    yield from tts.synthesize(text, rate=max(0.5, min(2.0, speed)), cancel=cancel)


# --- the router --------------------------------------------------------------------------

def make_audio_router(engine) -> APIRouter:
    router = APIRouter(prefix="/v1/audio")  # the token, when set, is checked in app/security.Edge

    async def heard(request: Request, task: str):
        try:
            form = await request.form(max_files=1, max_fields=20)
        except Exception as exc:  # noqa: BLE001 - a malformed multipart body
            return error(400, f"the body must be multipart/form-data with a 'file' field ({type(exc).__name__})")
        try:
            upload = form.get("file")
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            fields["timestamp_granularities"] = form.getlist("timestamp_granularities[]") or \
                form.getlist("timestamp_granularities") or ["segment"]
            args = TranscriptionForm.model_validate(fields)
            fmt = args.response_format.lower()
            if fmt not in TRANSCRIPT_FORMATS:
                raise ValueError(f"response_format {fmt[:20]!r}: choose one of {', '.join(TRANSCRIPT_FORMATS)}")
            if "word" in args.timestamp_granularities:
                raise ValueError("word timestamps are not available here; use timestamp_granularities=['segment'] "
                                 "with response_format verbose_json")
            if upload is None or isinstance(upload, str):
                raise ValueError("send the audio as a multipart file field named 'file'")
            asr = await asyncio.to_thread(engine.roles["asr"].get)
            language = (args.language or "").lower().strip() or None
            if task == "translate" and not asr.multilingual:
                raise Unavailable(f"{asr.name} understands English only, so it cannot translate",
                                  "set --asr whisper-base (a multilingual model) for /v1/audio/translations")
            if task == "transcribe" and language and language not in ("en", "english") and not asr.multilingual:
                raise ValueError(f"{asr.name} understands English only; set --asr whisper-base for "
                                 f"language {language[:20]!r}")
            audio, _ = await _upload_audio(engine, upload)
        except ValidationError as exc:
            return invalid(exc)
        except (ValueError, InputError) as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return _unavailable("speech recognition", exc) if task == "transcribe" else error(400, str(exc))
        work = (lambda: asr.transcribe(audio, language)) if task == "transcribe" else (lambda: translate(asr, audio))
        result = await asyncio.to_thread(work)
        return transcript_response(result, fmt, task)

    @router.post("/transcriptions", openapi_extra=_schema(TranscriptionForm, "multipart/form-data"))
    async def transcriptions(request: Request):
        """Speech to text (Whisper): json, text, srt, vtt or verbose_json with segment timestamps."""
        return await heard(request, "transcribe")

    @router.post("/translations", openapi_extra=_schema(TranscriptionForm, "multipart/form-data"))
    async def translations(request: Request):
        """Speech in any language to English text; needs a multilingual Whisper (--asr whisper-base)."""
        return await heard(request, "translate")

    @router.get("/voices")
    def list_voices() -> dict:
        return {"voices": voices(engine), "default": engine.config.tts.voice}

    @router.post("/speech", openapi_extra=_schema(SpeechRequest, "application/json"))
    async def speech(request: Request):
        """Text to speech, streamed as it is synthesized (the first sentence plays before the last is made)."""
        from app.api import iterate_in_thread, read_json
        from app.audio_out import Encoder

        try:
            args = SpeechRequest.model_validate(await read_json(request))
            text = args.input.strip()
            if not text:
                raise ValueError("input is empty: send the text to speak")
            if len(text) > MAX_SPEECH_CHARS:
                raise ValueError(f"input is {len(text):,} characters; the limit is {MAX_SPEECH_CHARS:,}")
            tts = await asyncio.to_thread(pick_voice, engine, args.voice)
            encoder = Encoder(args.response_format, tts.sample_rate)
        except ValidationError as exc:
            return invalid(exc)
        except ValueError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return _unavailable("speech synthesis", exc)
        cancel = CancelToken()
        chunks = iterate_in_thread(lambda: speech_chunks(tts, text, args.speed, cancel), cancel)

        async def body():
            async for chunk in chunks:
                if isinstance(chunk, Error):
                    break  # the log has it; the stream ends short
                if data := encoder.feed(chunk):
                    yield data
            yield encoder.close()

        return StreamingResponse(body(), media_type=encoder.media_type,
                                 headers={"Cache-Control": "no-cache", "X-Sample-Rate": str(encoder.out_rate)})

    return router
