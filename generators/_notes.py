"""Notes for the synthesized melodies: "C4 E4 G4", "F#5:0.5", "R" rests -> (Hz, seconds)."""
from __future__ import annotations

import re

from generators.base import RequestError

MAX_NOTE_S = 1.0  # notes without a length never last longer; the melody repeats instead
SEMITONE = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
NOTE = re.compile(r"^([A-Ga-g])([#b\u266f\u266d]?)(-?\d)?(?::(\d+(?:\.\d+)?))?$")
REST = re.compile(r"^(?:r|rest|-|_)(?::(\d+(?:\.\d+)?))?$", re.I)


def note_hz(name: str, octave: int) -> float:
    letter, acc = name[0].upper(), name[1:]
    semis = SEMITONE[letter] + (1 if acc in ("#", "\u266f") else -1 if acc in ("b", "\u266d") else 0)
    midi = 12 * (octave + 1) + semis
    return 440.0 * 2 ** ((midi - 69) / 12)


def parse_notes(text: str) -> list[tuple[float | None, float | None]]:
    """"C4 E4:0.5 G# R:0.25" -> [(hz or None for a rest, seconds or None)]; octave 4 if left out."""
    out = []
    for token in re.split(r"[\s,;|]+", text.strip()):
        if not token:
            continue
        rest = REST.match(token)
        if rest:
            out.append((None, float(rest.group(1)) if rest.group(1) else None))
            continue
        m = NOTE.match(token)
        if not m or not 0 <= int(m.group(3) or 4) <= 8:
            raise RequestError(f"I don't know the note {token!r}; write notes like C4 E4 G4, "
                               "F#5, Bb3 or C4:0.5 (seconds)")
        dur = float(m.group(4)) if m.group(4) else None
        if dur is not None and not 0.02 <= dur <= 10:
            raise RequestError(f"the note {token!r} must last 0.02 to 10 seconds")
        out.append((note_hz(m.group(1) + m.group(2), int(m.group(3) or 4)), dur))
    if not out:
        raise RequestError("give the melody's notes, like C4 E4 G4 C5")
    return out


def layout(notes: list, seconds: float) -> list[tuple[float, float, float | None]]:
    """(onset, duration, hz) filling `seconds`: notes without a length share the time left
    (at most MAX_NOTE_S each); a melody shorter than `seconds` repeats, a longer one is cut."""
    fixed = sum(d for _, d in notes if d is not None)
    free = sum(1 for _, d in notes if d is None)
    share = min(MAX_NOTE_S, (seconds - fixed) / free) if free and seconds - fixed > 0.05 * free else 0.25
    seq = [(hz, d if d is not None else share) for hz, d in notes]
    timeline, t = [], 0.0
    while t < seconds - 1e-9:
        for hz, d in seq:
            if t >= seconds - 1e-9:
                break
            timeline.append((t, d, hz))
            t += d
    return timeline


# --- building blocks ---
