"""The adapter contract: one file of media in, grounded facts out.

    adapter = SomeAdapter(**config)     # cheap; models load on first use
    p = adapter.perceive(path, out_dir, cancel)

`Perception.facts` is compact text for the LLM, every claim grounded in
what a tool really found (OCR lines quoted, counts, labels with scores,
times as m:ss for audio and video). `data` keeps the structure for the UI
and the API; `overlays` are images the UI shows to explain the answer
(text boxes and faces drawn on the picture, keyframe strips).
Bad media raise engine.errors.InputError with a message for the user;
`cancel` (anything with `.cancelled`) is checked between stages and raises
`Cancelled` (generators.base: the one cancellation exception). Memory and time stay bounded for any input size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import without_paths
from generators.base import CancelLike, check  # (adapters import `check` from here: one cancel contract)


@dataclass
class Perception:
    kind: str  # image | audio | video
    name: str  # the file name the user knows
    facts: str  # grounded text for the LLM
    data: dict = field(default_factory=dict)  # structured findings (see each adapter)
    overlays: list[str] = field(default_factory=list)  # annotated images for the perception panel
    timings_ms: dict = field(default_factory=dict)  # per stage


def stop_on_cancel(cancel: CancelLike):
    """A transformers StoppingCriteria that raises Cancelled between tokens once `cancel`
    is set (for model.generate calls)."""
    from transformers import StoppingCriteria

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            check(cancel)
            return False

    return StopOnCancel()


def mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_DIGEST = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?:\.[a-z0-9]{2,4})?(?![0-9a-f])")


def printable(name: str) -> str:
    """A user's file name as it is safe to print in a message: control and bidi-override
    characters escaped (a name may hold a newline or a terminal escape), so an error
    stays one line and cannot repaint the user's terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), name)


def public_message(text: str, path, name: str) -> str:
    """An error text as the user may see it: the file the server holds (`path`: a temp upload
    or the stored <sha256> copy) is called by the user's `name`, any other absolute path (a
    decoder's message quotes it) by its last part, and the text is one line."""
    shown, path = printable(name), Path(path)
    text = text.replace(str(path), "\0")
    if path.name:
        text = re.sub(rf"(?<![\w.-]){re.escape(path.name)}(?![\w-])", "\0", text)
    text = without_paths(_DIGEST.sub("\0", text))
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return printable(text).replace("\\x00", shown)


def release_memory() -> None:
    """Give the heap that a decoder freed back to the system once a file has been looked at.
    Decoding an 8000x8000 picture or a big video frame allocates hundreds of MB in pieces;
    glibc keeps what is freed in the (per-thread) arenas, so a server that had read a few
    such files stayed hundreds of MB larger for good (tests/test_fuzz.py: 782 -> 1079 MB
    over the hostile set; with this, 696 -> 713 MB). malloc_trim(0) takes well under a
    millisecond; without glibc it is not called."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None
