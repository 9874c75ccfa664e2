"""Models behind each role (llm, asr, tts, vad), each loaded once, lazily.

A Role loads in the background or on first use, is thread-safe, and never
crashes the app: a failure is kept as Unavailable (why, what to set) and
shown in the status panel and the API.
"""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

from engine.config import Config
from engine.errors import Unavailable

T = TypeVar("T")


class Role(Generic[T]):
    def __init__(self, name: str, load: Callable[[], T], label: Callable[[T], str] = lambda v: type(v).__name__,
                 what: str = "") -> None:
        self.name, self._load, self._label, self._what = name, load, label, what
        self._lock = threading.Lock()
        self._value: T | None = None
        self._error: Unavailable | None = None
        self._loading = False

    def get(self) -> T:
        """The loaded model; raises Unavailable (cached) when it cannot load."""
        with self._lock:
            if self._value is None and self._error is None:
                self._loading = True
                try:
                    self._value = self._load()
                except Unavailable as exc:
                    self._error = exc
                except Exception as exc:  # a broken file or library: report, never crash the app
                    self._error = Unavailable(f"loading the {self.name} model failed: {exc}", self._what)
                finally:
                    self._loading = False
            if self._error is not None:
                raise self._error
            return self._value  # type: ignore[return-value]

    def start(self, after: threading.Thread | None = None) -> threading.Thread:
        """Load in the background so the page is usable at once (once `after` has finished:
        on two cores, models loading side by side each take as long as all of them)."""
        self._loading = True

        def load() -> None:
            if after is not None:
                after.join()
            try:
                self.get()
            except Unavailable:
                pass

        thread = threading.Thread(target=load, name=f"load-{self.name}", daemon=True)
        thread.start()
        return thread

    @property
    def loaded(self) -> T | None:
        return self._value

    def state(self) -> tuple[str, str]:
        """(state, detail): ready | loading | unavailable | not loaded."""
        if self._value is not None:
            return "ready", self._label(self._value)
        if self._error is not None:
            return "unavailable", str(self._error).removeprefix("unavailable: ")
        return ("loading" if self._loading else "not loaded"), ""

    def close(self) -> None:
        close = getattr(self._value, "close", None)
        if close:
            close()


def build_roles(config: Config, keep: dict[str, Role] | None = None) -> dict[str, Role]:
    """Every role of `config`; those in `keep` are used as they are (loaded or not), and the
    new ones that lean on them (the talker voice on the llm) lean on those."""
    models = config.data_path / "models"

    def llm():
        from engine.llm import load_backend

        from dataclasses import replace

        backend = load_backend(replace(config.llm, talker=config.tts.backend == "talker"), models)
        backend.limit_queue(config.max_queue)
        backend.prime([{"role": "system", "content": config.system_prompt}])  # every chat starts with it
        return backend

    def asr():
        from engine.speech.asr import load_asr

        return load_asr(config.asr, models)

    def tts():
        if config.tts.backend == "talker":
            from engine.speech.talker import TalkerVoice

            return TalkerVoice(roles["llm"], config.tts.talker_speaker)
        from engine.speech.tts import load_tts

        return load_tts(config.tts)

    def vad():
        from engine.speech.vad import load_vad

        return load_vad(config.vad)

    name = lambda v: v.name  # noqa: E731
    roles = {
        "llm": Role("llm", llm, name, "check --llm and the logs"),
        "asr": Role("asr", asr, name, "check --asr and the logs"),
        "tts": Role("tts", tts, name, "check --voice and the logs"),
        "vad": Role("vad", vad, lambda v: "Silero VAD (ONNX)", "check --set vad.model and the logs"),
    }
    roles.update(keep or {})
    return roles
