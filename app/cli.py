"""`python run_app.py chat "message"`: the engine from a terminal, no browser.

Plain mode streams the answer to stdout (notices and errors to stderr);
`--json` prints one JSON event per line. Ctrl-C stops the answer and keeps
the partial text, as Stop does in the browser. Exit code 1 on any error.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from engine.perception.base import printable
from engine.config import Config
from engine.errors import InputError
from engine.events import AudioChunk, CancelToken, Done, Error, MediaResult, Notice, Perceived, TextDelta, Transcript
from engine.engine import Engine
from engine.session import Session, Turn


def chat(config: Config, message: str, attach: list[str], as_json: bool,
         conversation: str | None = None, speak_to: str | None = None) -> int:
    _log_in_one_line()
    engine = Engine(config)
    cancel = CancelToken()
    failed = False
    spoken: list[AudioChunk] = []

    def emit(event) -> None:
        if as_json:
            print(json.dumps(event.to_dict(), ensure_ascii=False), flush=True)
        elif isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Transcript):
            source = f" in {printable(event.source)}" if event.source else ""
            print(f"[heard{source}] {event.text}", file=sys.stderr, flush=True)
        elif isinstance(event, Perceived):  # a file's name may hold a newline or a terminal escape
            print(f"[seen in {printable(event.name)}] {printable(event.facts)}", file=sys.stderr, flush=True)
        elif isinstance(event, MediaResult):
            print(f"\n[{event.kind}] {event.path}", flush=True)
        elif isinstance(event, (Notice, Error)):
            print(f"\n{'note' if isinstance(event, Notice) else 'error'}: {printable(event.message)}", file=sys.stderr,
                  flush=True)
        elif isinstance(event, Done):
            if event.interrupted:
                print("\n[interrupted]", file=sys.stderr)
            print(flush=True)
            print(f"conversation: {event.conversation_id}", file=sys.stderr)

    try:
        session = Session(engine, conversation)
        events = session.submit(Turn(message, tuple(attach), speak=bool(speak_to)), cancel)
        try:
            for event in events:
                failed = failed or isinstance(event, Error)
                if isinstance(event, AudioChunk):
                    spoken.append(event)
                if isinstance(event, Done) and speak_to:
                    _write_answer(speak_to, spoken, emit)
                emit(event)
        except KeyboardInterrupt:
            cancel.cancel("interrupted from the terminal")
            for event in events:  # finishes within one step and stores the partial answer
                emit(event)
    except InputError as exc:
        emit(Error(str(exc)))
        failed = True
    finally:
        engine.close()
    return 1 if failed else 0


def _write_answer(path: str, chunks: list[AudioChunk], emit) -> None:
    """Write the spoken answer to `path` (a WAV) and report it as a media result."""
    if not chunks:
        emit(Notice(f"No spoken answer to write to {path}."))
        return
    import wave

    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(chunks[0].sample_rate)
        for chunk in chunks:
            w.writeframes(chunk.pcm)
    seconds = sum(len(c.pcm) for c in chunks) / 2 / chunks[0].sample_rate
    emit(MediaResult("audio", str(Path(path).resolve()), {"duration_s": round(seconds, 3)}))


class _OneLine(logging.Formatter):
    """A log record as one plain line: the engine logs a tool's refusal or a decoder's failure
    with its traceback (for a server's log); a terminal gets the reason, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        return printable(text)


def _log_in_one_line() -> None:
    """Warnings and errors to stderr, one line each (Python's fallback handler prints tracebacks)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)

