"""`python run_app.py chat "message"`: the engine from a terminal, no browser.

Plain mode streams the answer to stdout (notices and errors to stderr);
`--json` prints one JSON event per line. Ctrl-C stops the answer and keeps
the partial text, as Stop does in the browser. Exit code 1 on any error.
"""
from __future__ import annotations

import json
import sys

from engine.config import Config
from engine.errors import InputError
from engine.events import CancelToken, Done, Error, MediaResult, Notice, TextDelta
from engine.session import Engine, Turn


def chat(config: Config, message: str, attach: list[str], as_json: bool,
         conversation: str | None = None, max_new_tokens: int | None = None) -> int:
    engine = Engine(config)
    cancel = CancelToken()
    failed = False

    def emit(event) -> None:
        if as_json:
            print(json.dumps(event.to_dict(), ensure_ascii=False), flush=True)
        elif isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, MediaResult):
            print(f"\n[{event.kind}] {event.path}", flush=True)
        elif isinstance(event, (Notice, Error)):
            print(f"\n{'note' if isinstance(event, Notice) else 'error'}: {event.message}", file=sys.stderr, flush=True)
        elif isinstance(event, Done):
            if event.interrupted:
                print("\n[interrupted]", file=sys.stderr)
            print(flush=True)
            print(f"conversation: {event.conversation_id}", file=sys.stderr)

    try:
        session = engine.session(conversation)
        events = session.submit(Turn(message, tuple(attach), max_new_tokens=max_new_tokens), cancel)
        try:
            for event in events:
                failed = failed or isinstance(event, Error)
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
