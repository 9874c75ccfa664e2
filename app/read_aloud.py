"""Read aloud: any answer on the page spoken in the chosen voice, streamed sentence by sentence.

`POST /voice/read-aloud` with `{"text": "..."}` answers with raw audio (`audio/pcm`: mono
int16 little-endian at the `X-Sample-Rate` the voice speaks at), sent one sentence at a time
as it is made, so the page plays the first sentence while the next is synthesised
(assets/read_aloud.js plays it with Web Audio, as voice mode plays answers). The voice and
speaking rate are the engine's tts role and `config.tts` (the page's Voice settings).

Under /voice, so app/security.Edge gives it the page's protection before a byte is read:
Host and Origin checked, and with a token set, the token or the page's login cookie. Bounded
here: the text (`config.max_prompt_chars`, checked on the bytes before parsing), the streams
at once (MAX_STREAMS, then 429), how far synthesis runs ahead of playback (LEAD_S, so Stop
wastes little) and how long one stream may last (MAX_S). Closed early (Stop, another answer
read, the page gone), the stream's CancelToken stops the voice within one sentence.
"""
from __future__ import annotations

import asyncio
import html
import json
import re
import time
from typing import Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.bodies import error
from engine.errors import Unavailable, refuse_lone_surrogates
from engine.events import CancelToken, Error

ROUTE = "/voice/read-aloud"
MAX_STREAMS = 4  # answers read at once by this server (a page reads one at a time)
LEAD_S = 8.0  # audio synthesised ahead of real time at most
MAX_S = 30 * 60  # one stream's wall-clock limit

_META = re.compile(r'<span\s+class="turn-meta"[^>]*>.*\Z', re.S | re.I)  # (the closing line, spans inside it)
_FENCE = re.compile(r"^[ \t]*(```|~~~).*?(?:^[ \t]*\1[^\n]*$|\Z)", re.S | re.M)
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_INTERRUPTED = re.compile(r"\*?\(interrupted\)\*?\s*$")


def speakable(text: str) -> str:
    """An answer as it should sound: without code blocks, our trailing turn-meta markup, HTML
    tags, link targets or the interrupted mark (markdown's own symbols are dropped sentence by
    sentence, engine/speech/tts._clean). Works on the stored markdown and on the page's text."""
    text = _META.sub(" ", text)
    text = _FENCE.sub(" ", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = html.unescape(_TAG.sub(" ", text))
    text = _INTERRUPTED.sub("", text.rstrip())
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def sentences(text: str, first_chars: int = 0) -> Iterator[str]:
    """The text in speakable pieces, lazily: sentences, the first one cut early at a clause
    (engine/speech/tts.SentenceBuffer, the pieces voice mode speaks)."""
    from engine.speech.tts import SentenceBuffer

    buffer = SentenceBuffer(first_chars)
    for line in text.splitlines():
        yield from buffer.push(line + "\n")
    if rest := buffer.flush():
        yield rest


def spoken(tts, text: str, rate: float, cancel: CancelToken, first_chars: int = 0, lead_s: float = LEAD_S,
           max_s: float = MAX_S, clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """int16 PCM, a block per sentence as the voice makes it; never more than `lead_s` ahead of
    real time, for at most `max_s`; stops within one sentence of `cancel`."""
    from engine.speech.audio import to_int16

    started, made_s = clock(), 0.0
    for piece in sentences(text, first_chars):
        for audio in tts.synthesize(piece, rate, cancel):
            if cancel.cancelled:
                return
            made_s += len(audio) / tts.sample_rate
            yield to_int16(audio).tobytes()
        ahead = made_s - (clock() - started)
        if ahead > lead_s and cancel.wait(ahead - lead_s):
            return
        if cancel.cancelled or clock() - started > max_s:
            return


def voice(engine):
    """The voice the page chose (the tts role); Unavailable saying why not and what to set."""
    tts = engine.roles["tts"].get()
    if tts.from_trace:
        raise Unavailable(f"{tts.name or 'this voice'} speaks answers as they are written, not given text",
                          "set --tts-backend piper to read answers aloud")
    return tts


class TooLong(ValueError):
    """The text is over the limit (a 413)."""


async def read_text(request: Request, max_chars: int) -> str:
    """The JSON body's "text", read within a byte bound made from `max_chars` (no more than that
    is ever held); TooLong past either bound, ValueError for a malformed body."""
    limit = max_chars * 6 + 4096  # the most a JSON string of max_chars characters can take
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLong(f"the request is {int(declared):,} bytes; read aloud takes at most {max_chars:,} characters")
    parts, size = [], 0
    async for block in request.stream():
        size += len(block)
        if size > limit:
            raise TooLong(f"the request is over {limit:,} bytes; read aloud takes at most {max_chars:,} characters")
        parts.append(block)
    try:
        body = json.loads(b"".join(parts))
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None
    except ValueError as exc:  # (undecodable, malformed, a number of over 4300 digits)
        raise ValueError(f"the body is not valid JSON ({str(exc).split(';')[0][:200]})") from None
    text = body.get("text") if isinstance(body, dict) else None
    refuse_lone_surrogates(b"".join(parts), text)
    if not isinstance(text, str):
        raise ValueError('send {"text": "the answer to read"}')
    if len(text) > max_chars:
        raise TooLong(f"the text is {len(text):,} characters; read aloud takes at most {max_chars:,}")
    return text


class _Stream(StreamingResponse):
    """The audio stream; however it ends (finished, client gone, server stopping), its
    generator is closed (which cancels the voice) and its slot given back."""

    def __init__(self, body, release: Callable[[], None], **kwargs) -> None:
        super().__init__(body, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            await self.body_iterator.aclose()


def make_read_aloud_router(engine) -> APIRouter:
    router = APIRouter()
    streams = {"open": 0}  # touched on the event loop only

    def release() -> None:
        streams["open"] -= 1

    @router.post(ROUTE, include_in_schema=False)  # a route of the page, not of the OpenAI API
    async def read_aloud(request: Request):
        """Speak the given answer text (markup and code left out), streamed as it is synthesised."""
        from app.api import iterate_in_thread

        try:
            text = speakable(await read_text(request, engine.config.max_prompt_chars))
            if not text:
                raise ValueError("there is nothing to read: the answer has no text (code is not read aloud)")
            tts = await asyncio.to_thread(voice, engine)
        except TooLong as exc:
            return error(413, str(exc))
        except ValueError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            how = f"; {exc.what_to_set}" if exc.what_to_set else ""
            return error(503, f"Read aloud is unavailable: {exc.why}{how}", "server_error")
        if streams["open"] >= MAX_STREAMS:
            return error(429, f"{MAX_STREAMS} answers are being read aloud already; stop one first",
                         headers={"retry-after": "5"})
        streams["open"] += 1
        cancel, cfg = CancelToken(), engine.config.tts
        speak = lambda: spoken(tts, text, cfg.rate, cancel, cfg.first_piece_chars, LEAD_S, MAX_S)  # noqa: E731
        chunks = iterate_in_thread(speak, cancel)

        async def body():
            try:
                async for chunk in chunks:
                    if isinstance(chunk, Error):
                        break  # the log has it; the stream ends short
                    yield chunk
            finally:
                await chunks.aclose()  # cancels the voice

        return _Stream(body(), release, media_type="audio/pcm",
                       headers={"Cache-Control": "no-store", "X-Sample-Rate": str(tts.sample_rate)})

    return router
