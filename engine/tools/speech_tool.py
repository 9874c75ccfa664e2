"""Speech as a generated sound ("say 'welcome aboard' in a calm voice", "add a
voice-over saying ... to this clip"): the engine's TTS role as a generator
backend (task "audio", name "tts"), registered by the engine because the voice
lives in the engine. Muxed onto a video when one is given.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from generators.base import Backend, RequestError, Result, check

SAY = re.compile(r"\b(say|saying|says|speak|read|pronounce|voice[- ]?over|narrat\w*|announce\w*)\b", re.I)
QUOTED = re.compile(r"[\"“'‘]([^\"”’]{1,600}?)[\"”'’](?:\s|$|[.,!?])")


def words_to_say(prompt: str) -> str:
    """The words to speak: the quoted part, else what follows say/read/narrate."""
    if m := QUOTED.search(prompt + " "):
        return m.group(1).strip()
    m = re.search(r"\b(?:say|saying|speak|read(?: out| aloud)?|pronounce|narrate|announce)\s*:?\s*(.+)$", prompt, re.I)
    return m.group(1).strip(" .") if m else ""


class SpeechAudio(Backend):
    task, name = "audio", "tts"

    def __init__(self, tts_role) -> None:
        self.role = tts_role

    def can_do(self, request: dict, inputs) -> bool:
        return request.get("sound") == "speech" or bool(SAY.search(request.get("prompt", "")) and
                                                          words_to_say(request.get("prompt", "")))

    def run(self, request: dict, inputs, out_dir: Path, progress, cancel) -> Result:
        from engine.speech.audio import write_wav

        text = words_to_say(request.get("prompt", "")) or request.get("prompt", "")
        if not text.strip():
            raise RequestError("say what? put the words to speak in quotes")
        tts = self.role.get()
        pieces = []
        for piece in tts.synthesize(text, cancel=cancel):
            check(cancel)
            pieces.append(piece)
            progress("speaking", min(0.95, sum(len(p) for p in pieces) / (tts.sample_rate * max(1.0, len(text) / 14))))
        check(cancel)
        if not pieces:
            raise RequestError("there was nothing to say")
        audio = np.concatenate(pieces)
        video = [Path(p) for p in inputs if Path(p).suffix.lower() in (".mp4", ".mov", ".webm", ".mkv", ".avi")]
        out_dir = Path(out_dir)
        wav = write_wav(out_dir / ("speech.wav" if not video else ".speech.wav"), audio, tts.sample_rate)
        if not video:
            progress("speaking", 1.0)
            return Result("audio", str(wav), {"backend": self.name, "duration_s": round(len(audio) / tts.sample_rate, 3),
                                              "text": text})
        from generators.ffmpeg import probe, sound_onto_video

        info = sound_onto_video(video[0], wav, out_dir / "voiceover.mp4", cancel,
                                mix=probe(video[0]).get("has_audio", False))
        progress("mixing", 1.0)
        return Result("video", str(out_dir / "voiceover.mp4"), {"backend": self.name, "duration_s": info.get("duration_s"), "text": text,
                                          "width": info.get("width"), "height": info.get("height")})


def entry(role, tts_cfg):
    """A registry entry for the engine's own voice (kept by the engine, not in the global registry,
    because it belongs to one engine's TTS role)."""
    from generators.registry import Entry

    def available() -> tuple[bool, str]:
        if tts_cfg.backend == "none":
            return False, "speech synthesis is off: set --tts-backend piper"
        state, detail = role.state()
        return state != "unavailable", detail

    return Entry("audio", "tts", lambda **_: SpeechAudio(role), available)
