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


def refuse_lone_surrogates(raw: bytes | str, doc, what: str = "the JSON body") -> None:
    """InputError naming the field when a parsed JSON document holds half a UTF-16 surrogate pair
    ("\\ud800" alone): JSON may escape one, but it is not Unicode, so no tokenizer, encoder or
    database takes it. `raw` is the text it was parsed from (skipped fast when it escapes none)."""
    if not re.search(rb"\\u[dD][89a-fA-F]" if isinstance(raw, bytes) else r"\\u[dD][89a-fA-F]", raw):
        return
    stack = [(doc, "")]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                stack.append((key, at or "a key"))  # (a key is named by where it is)
                stack.append((value, f"{at}.{key}" if at else str(key)))
        elif isinstance(node, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, str) and re.search("[\ud800-\udfff]", node):
            raise InputError(f"{what} holds a lone UTF-16 surrogate (half of an escaped pair such as \\ud800) "
                             f"at {at[:80] or 'its top level'}: send valid Unicode text")
