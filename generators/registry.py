"""A decorator registry of generator backends keyed by (task, name).

It refuses duplicate names and lists every task with the backends that can
serve it, or why none can. Backends register themselves when their module is
imported; nothing heavy is imported to list them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from generators.base import Backend
from generators.tools import TOOLS

TASKS = {tool.task: tool.task_title for tool in TOOLS.values()}  # task -> what it is, in words


@dataclass(frozen=True)
class Entry:
    task: str
    name: str
    factory: Callable[..., Backend]
    available: Callable[[], tuple[bool, str]]  # (ok, why not / what to set)
    config_field: str = ""  # the GeneratorsConfig field with the backend's model ("": it takes none)


_REGISTRY: dict[tuple[str, str], Entry] = {}
_FAILED: dict[str, str] = {}  # backend module -> why it could not be imported

# Every backend module, in order of preference within a task: the classical
# backends first where they do the request exactly (a crop is a crop), the
# diffusion ones for what only they can do.
BACKENDS = ("image_opencv", "video_ffmpeg", "scene_trimesh", "audio_synth", "image_diffusion", "edit_diffusion",
            "video_diffusion", "shape_diffusion", "audio_diffusion")


def register(task: str, name: str, available: Callable[[], tuple[bool, str]] = lambda: (True, "")):
    """Class decorator for a `Backend` subclass: `@register("image", "opencv")`."""
    if task not in TASKS:
        raise ValueError(f"unknown generator task {task!r}; tasks are {', '.join(TASKS)}")

    def wrap(factory: type[Backend]):
        key = (task, name)
        if not (isinstance(factory, type) and issubclass(factory, Backend)):
            raise ValueError(f"the {name!r} generator must subclass generators.base.Backend (it declares what "
                             "the engine reads)")
        if key in _REGISTRY:
            raise ValueError(f"a generator named {name!r} is already registered for {task!r}")
        _REGISTRY[key] = Entry(task, name, factory, available, factory.config_field)
        return factory

    return wrap


def entries(task: str | None = None) -> list[Entry]:
    return [e for (t, _), e in _REGISTRY.items() if task in (None, t)]  # in order of preference


def task_status(task: str) -> tuple[bool, str]:
    """(available, detail) for a task: the first available backend, or why none is."""
    reasons = []
    for entry in entries(task):
        ok, why = entry.available()
        if ok:
            return True, entry.name
        reasons.append(f"{entry.name}: {why}")
    if reasons:
        return False, "; ".join(reasons)
    return False, f"no {TASKS.get(task, task)} backend is built into this version yet; nothing to set"


def load_backends() -> None:
    """Import every backend module so it registers (cheap: heavy imports are lazy)."""
    import importlib

    for mod in BACKENDS:
        if f"generators.{mod}" in _FAILED:
            continue
        try:
            importlib.import_module(f"generators.{mod}")
        except Exception as exc:  # a broken or missing optional backend must not take the others down
            _FAILED[f"generators.{mod}"] = f"{type(exc).__name__}: {exc}"


def failed_imports() -> dict[str, str]:
    return dict(_FAILED)
