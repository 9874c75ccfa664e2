"""Errors raised where input enters; each message says what was wrong and what to do."""
from __future__ import annotations

import re

# an absolute path of two parts or more; `base` is its last part
ABS_PATH = re.compile(r"(?<![\w.:/\\])(?:/[^\s/'\"<>|:]+)+/(?P<base>[^\s/'\"<>|:,;]+)")


def without_paths(text: str) -> str:
    """"/root/.cache/x/model.bin" -> "model.bin": a message never shows where the server keeps things."""
    return ABS_PATH.sub(lambda m: m.group("base"), text)


class Unavailable(RuntimeError):
    """A role cannot run here. `why` and `what_to_set` are shown in the UI and API."""

    def __init__(self, why: str, what_to_set: str = "") -> None:
        self.why = why
        self.what_to_set = what_to_set
        super().__init__(f"unavailable: {why}" + (f"; {what_to_set}" if what_to_set else ""))


class InputError(ValueError):
    """The user's input (prompt, file, request) was rejected; safe to show as is."""
