"""What one realtime client asked for (session.update): its instructions, voice, functions and
turn detection, laid over the shared engine for that connection's Session (app/realtime.py)."""
from __future__ import annotations

from dataclasses import replace


class _Given:
    """A role whose model is already loaded (this connection's own voice)."""

    def __init__(self, value) -> None:
        self.value = value

    def get(self):
        return self.value

    def state(self) -> tuple[str, str]:
        return "ready", self.value.name


class Instructed:
    """The engine as this connection's Session sees it: its own instructions as the system prompt,
    its own turn-detection settings and voice; everything else is the shared engine."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.instructions = ""
        self.vad: dict = {}
        self.tts = None  # a packaged voice other than the configured one, when the client picked one
        self.tools: tuple = ()  # the client's functions (session.update tools), in the chat API's shape
        self.tool_choice = "auto"

    def params(self, *args, **kwargs):
        """The engine's params, with this connection's functions."""
        params = self._engine.params(*args, **kwargs)
        return replace(params, tools=self.tools, tool_choice=self.tool_choice) if self.tools else params

    @property
    def roles(self) -> dict:
        roles = self._engine.roles
        return roles if self.tts is None else {**roles, "tts": _Given(self.tts)}

    @property
    def config(self):
        config = self._engine.config
        if self.instructions:
            config = replace(config, system_prompt=self.instructions)
        return replace(config, vad=replace(config.vad, **self.vad)) if self.vad else config

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def modalities_of(value) -> list[str]:
    if not isinstance(value, list) or not value or not set(value) <= {"text", "audio"}:
        raise ValueError("modalities must be ['text'] or ['text', 'audio']")
    return ["text", "audio"] if "audio" in value else ["text"]


def vad_settings(td: dict) -> dict:
    """OpenAI's server_vad fields -> this engine's VAD config (engine.config.VADConfig)."""
    out = {}
    if td.get("threshold") is not None:
        out["threshold"] = float(td["threshold"])
        if not 0.0 < out["threshold"] < 1.0:
            raise ValueError("turn_detection.threshold must be between 0 and 1")
    if td.get("silence_duration_ms") is not None:
        out["end_silence_ms"] = int(td["silence_duration_ms"])
        if not 100 <= out["end_silence_ms"] <= 5000:
            raise ValueError("turn_detection.silence_duration_ms must be 100-5000")
    return out
