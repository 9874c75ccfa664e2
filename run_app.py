#!/usr/bin/env python3
"""The one entry point.

    python run_app.py [--profile cpu] [--llm ...] [--port 7860]   start the app
    python run_app.py chat "message" [--attach FILE] [--json]      chat from a terminal

Only the standard library and engine.config are imported before the
arguments are parsed, so --help is instant.
"""
from __future__ import annotations

import argparse
import sys

from engine.config import ConfigError, add_arguments, config_from_args


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="run_app.py", description="Local omni-modal assistant.")
    add_arguments(main)
    sub = main.add_subparsers(dest="command", metavar="{serve,chat}")
    serve = sub.add_parser("serve", help="start the web app (the default)")
    add_arguments(serve)
    chat = sub.add_parser("chat", help="send one message from the terminal and stream the answer")
    add_arguments(chat)
    chat.add_argument("message", nargs="?", default="", help="the message (use '-' to read stdin)")
    chat.add_argument("--attach", action="append", default=[], metavar="FILE",
                      help="attach an image, audio or video file (repeatable)")
    chat.add_argument("--json", action="store_true", help="print one JSON event per line")
    chat.add_argument("--conversation", metavar="ID", help="continue a stored conversation")
    chat.add_argument("--speak-to", metavar="WAV", help="also speak the answer and write it to this WAV file")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "chat":
        from app.cli import chat

        message = sys.stdin.read() if args.message == "-" else args.message
        return chat(config, message, args.attach, args.json, args.conversation, args.speak_to)
    from app.server import serve

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
