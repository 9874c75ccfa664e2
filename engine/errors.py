"""Errors raised where input enters; each message says what was wrong and what to do."""
from __future__ import annotations


class Unavailable(RuntimeError):
    """A role cannot run here. `why` and `what_to_set` are shown in the UI and API."""

    def __init__(self, why: str, what_to_set: str = "") -> None:
        self.why = why
        self.what_to_set = what_to_set
        super().__init__(f"unavailable: {why}" + (f"; {what_to_set}" if what_to_set else ""))


class InputError(ValueError):
    """The user's input (prompt, file, request) was rejected; safe to show as is."""
