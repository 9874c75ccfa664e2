"""What the assistant takes from attached media, before it answers.

- A live utterance (voice mode) is transcribed: its words are the message.
- Attached files go through the perception adapters (engine/perception/perceiver.py):
  images -> OCR, faces, colours; audio -> speech / music / noise segments with
  transcripts and sound labels; video -> scene keyframes + its sound track.
  Each yields a Perceived event (the UI's perception panel), audio also a
  Transcript. The facts go to the LLM in brackets after the user's text and
  are stored with the turn, so later turns can refer back to them.
- What cannot be read is said plainly (and why, and what to set).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator

from engine.perception.base import mmss
from engine.errors import InputError, Unavailable
from engine.events import Event, Notice, Perceived, Transcript
from generators.base import MediaKind

HEARD_MAX_S = 3600  # the fast path transcribes at most this much of a file (as AudioPerception does)


@dataclass
class Understood:
    heard: dict = field(default_factory=dict)  # sha256 -> {"text", "language"}: speech in audio files
    facts: dict = field(default_factory=dict)  # file name -> grounded facts
    overlays: dict = field(default_factory=dict)  # file name -> annotated images (the perception panel)


def understand(engine, records, spoken: bool, cancel=None, question: str = "") -> Generator[Event, None, Understood]:
    got = Understood()
    if spoken or not engine.perceiver.enabled:
        got.heard = yield from transcribe(engine, records)
        return got
    for rec in records:
        if rec.kind not in ("image", "audio", "video"):
            continue
        try:
            p = engine.perceiver.perceive(rec, cancel, question)
        except InputError as exc:
            got.facts[rec.name] = f"(could not be read: {exc})"
            yield Notice(f"I couldn't look at {rec.name}: {exc}")
            continue
        segments = (p.data.get("audio") or {}).get("segments", []) if rec.kind == "video" \
            else p.data.get("segments", [])
        speech = " ".join(s["text"].strip() for s in segments if s.get("text")).strip()
        if rec.kind == "audio":
            got.heard[rec.sha256] = {"text": speech, "language": p.data.get("language", "")}
        if speech or rec.kind == "audio":
            yield Transcript(speech, p.data.get("language", ""), rec.name, round(p.data.get("duration_s", 0.0), 3))
        got.facts[rec.name] = p.facts
        got.overlays[rec.name] = list(p.overlays)
        yield Perceived(rec.kind, rec.name, p.facts, tuple(p.overlays), p.data, p.timings_ms.get("total", 0.0))
    return got


def transcribe(engine, records) -> Generator[Event, None, dict]:
    """Whisper on audio attachments (the fast path for a live utterance)."""
    heard: dict = {}
    audio = [r for r in records if r.kind == "audio"]
    if not audio:
        return heard
    try:
        asr = engine.roles["asr"].get()
    except Unavailable:
        return heard  # the answer says plainly that audio cannot be read, and why
    for rec in audio:
        samples, cut = _heard(rec.path, HEARD_MAX_S, rec.name)
        if cut:
            yield Notice(f"Only the first {mmss(HEARD_MAX_S)} of {rec.name} was transcribed.")
        result = asr.transcribe(samples, engine.config.asr.language or None)
        heard[rec.sha256] = {"text": result.text, "language": result.language}
        yield Transcript(result.text, result.language, rec.name, round(result.duration_s, 3))
    return heard


def _heard(path, max_s: float, name: str | None = None):
    """(mono float32 at 16 kHz, whether it was cut): decoded and mixed down in 10 s blocks by the
    one audio decoder (engine.speech.decode), at most max_s seconds (and a second more, to know
    whether there was more). Read whole, 5 minutes of 8-channel 48 kHz silence (a small FLAC)
    took 1.5 GB, and the 4 hours that ingest accepts would take 22 GB."""
    from engine.speech import decode
    from engine.speech.audio import WHISPER_RATE

    limit = int(max_s * WHISPER_RATE)
    samples = decode.decode(path, WHISPER_RATE, name=name, duration=max_s + 1.0)
    return samples[:limit], len(samples) > limit


def user_message(text: str, records, heard: dict, spoken: bool) -> str:
    """The user's turn as stored: typed text, plus what was heard in attached audio."""
    said = [(r.name, heard[r.sha256]["text"]) for r in records if r.sha256 in heard and heard[r.sha256]["text"]]
    if spoken or (not text and said):
        return " ".join(t for _, t in said) if not text else f"{text} {' '.join(t for _, t in said)}"
    return text + "".join(f"\n\n[{name}, transcribed: {t}]" for name, t in said)


def with_facts(content: str, facts: dict) -> str:
    """The user's turn as the LLM reads it: the stored text plus what the tools found."""
    return content + "".join(f"\n\n[{name} - what the perception tools found: {f}]" for name, f in facts.items())


def unreadable_note(engine, records, got: Understood) -> str:
    unread = [r for r in records if r.name not in got.facts and not (r.kind == "audio" and r.sha256 in got.heard)]
    kinds = sorted({MediaKind(r.kind) for r in unread}, key=list(MediaKind).index)
    if not kinds:
        return ""
    what = " or ".join(k.plural for k in kinds)
    names = ", ".join(r.name for r in unread)
    if kinds == ["audio"]:
        why = f"speech recognition is unavailable ({engine.roles['asr'].state()[1]})"
    elif kinds == ["model3d"]:
        why = "I can show 3D models but not look inside them"
    else:
        why = engine.perceiver.status()[1] if not engine.perceiver.enabled else "no adapter reads them"
    return f"(I received {names}, but I can't read {what}: {why}, so I can only use your text.)\n\n"
