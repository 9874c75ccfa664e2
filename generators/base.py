"""The generator contract: every backend, classical or diffusion, looks the same.

    backend = SomeBackend(**config)           # cheap; weights load on first run
    result = backend.run(request, inputs, out_dir, progress, cancel)

Every backend subclasses `Backend`, which declares what the engine reads:
its `task` and `name`, whether it is `resident` (holds a model that needs
device room) with `unload()`, `can_do(request, inputs)` and the config field
naming its model.

- `request`: a dict already validated against the backend's tool schema
  (`validate(schema, args)`), defaults filled in.
- `inputs`: paths of the media the request refers to (already resolved by
  the engine: "it", "the last image" -> a file), possibly empty.
- `out_dir`: a directory to write the result into (the engine stores it).
- `progress(stage, fraction)`: called as work goes on (fraction in [0, 1]).
- `cancel`: anything with a `.cancelled` bool; checked every step; a
  cancelled run raises `Cancelled` and leaves no partial result.
Returns `Result(kind, path, meta)`; bad arguments or unusable inputs raise
`RequestError` with a message for the user; any other failure raises
`GenerationError`. Generators never import `engine` or `app`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence


class MediaKind(StrEnum):
    """What a media file is, with the words for it: `noun` for one made file ("Here is the
    sound"), `plural` for what a model cannot read ("reads text only, not images")."""

    IMAGE = "image", "image", "images"
    AUDIO = "audio", "sound", "audio"
    VIDEO = "video", "video", "video"
    MODEL3D = "model3d", "3D model", "3D models"

    def __new__(cls, value: str, noun: str, plural: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.noun, member.plural = noun, plural
        return member


@dataclass(frozen=True)
class Result:
    kind: str  # a MediaKind
    path: str
    meta: dict = field(default_factory=dict)  # width/height, duration_s, frames, backend, ...


class GenerationError(Exception):
    """The generator failed; the message is shown to the user."""


class RequestError(GenerationError):
    """The request cannot be done as asked (bad argument, wrong input kind, out of range)."""


class Cancelled(GenerationError):
    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


ProgressFn = Callable[[str, float], None]


class CancelLike(Protocol):
    @property
    def cancelled(self) -> bool: ...


class Backend:
    """What every generator backend declares; the defaults are a light backend (no model to
    load, nothing to give back) that tries any request of its task. The engine reads these,
    never probes for them."""

    task: str = ""  # a registry task (a Tool's task)
    name: str = ""  # backend name shown with each result
    resident: bool = False  # holds a model that needs device room: one resident at a time, the LLM parks for it
    config_field: str = ""  # the GeneratorsConfig field naming its model ("": it takes none)

    def can_do(self, request: dict, inputs: Sequence[Path]) -> bool:
        """Whether this backend does `request` well (the engine's pick among a task's backends);
        no weights are touched."""
        return True

    def unload(self) -> None:
        """Give back what the model holds (a resident backend reloads on its next run)."""

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path,
            progress: ProgressFn, cancel: CancelLike) -> Result:
        raise NotImplementedError


def check(cancel: CancelLike) -> None:
    if cancel is not None and cancel.cancelled:
        raise Cancelled()


def no_progress(stage: str, fraction: float) -> None:
    pass


# --- a small JSON-schema subset, shared by validation and constrained decoding ---
# Supported: type object/array/string/integer/number/boolean, properties,
# required, enum, minimum/maximum, minLength/maxLength, minItems/maxItems,
# items, default, description. additionalProperties is always false.

def validate(schema: dict, value: Any, where: str = "") -> Any:
    """Check `value` against `schema`; fill defaults; raise RequestError naming the field."""
    name = where or "the request"
    kind = schema.get("type")
    if "enum" in schema:
        if value not in schema["enum"]:
            raise RequestError(f"{name} must be one of {', '.join(map(str, schema['enum']))}; got {value!r}")
        return value
    if kind == "object":
        if not isinstance(value, dict):
            raise RequestError(f"{name} must be an object")
        props = schema.get("properties", {})
        extra = sorted(set(value) - set(props))
        if extra:
            raise RequestError(f"{name} has unknown field(s) {', '.join(extra)}; known: {', '.join(props)}")
        out = {}
        for key, sub in props.items():
            if key in value:
                out[key] = validate(sub, value[key], f"{where}.{key}" if where else key)
            elif key in schema.get("required", ()):
                raise RequestError(f"{key if not where else where + '.' + key} is required")
            elif "default" in sub:
                out[key] = sub["default"]
        return out
    if kind == "array":
        if not isinstance(value, list):
            raise RequestError(f"{name} must be a list")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if len(value) < lo or (hi is not None and len(value) > hi):
            raise RequestError(f"{name} must have {lo} to {hi if hi is not None else 'any number of'} items")
        return [validate(schema["items"], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if kind == "string":
        if not isinstance(value, str):
            raise RequestError(f"{name} must be text")
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if len(value.strip()) < lo or (hi is not None and len(value) > hi):
            raise RequestError(f"{name} must be {lo} to {hi} characters long")
        return value
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{name} must be a number")
        if kind == "integer":
            if float(value) != int(value):
                raise RequestError(f"{name} must be a whole number")
            value = int(value)
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise RequestError(f"{name} must be between {lo} and {hi}; got {value}")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false")
        return value
    raise ValueError(f"unsupported schema at {name}: {schema}")
