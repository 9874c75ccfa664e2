"""Running a tool call: pick the backend, run it with progress and cancel, store the result.

The generator runs on a worker thread; its progress comes back as Progress
events and Stop reaches it through the CancelToken (diffusion checks it every
step). Whatever happens (bad arguments, a crash, out of memory, a cancel), the
turn ends with a clear message and the conversation and its media are intact.
"""
from __future__ import annotations

import logging
import queue
import re
import tempfile
import threading
from pathlib import Path
from typing import Generator

from engine import media as media_mod
from engine.errors import without_paths
from engine.events import CancelToken, Event, MediaResult, Progress, ToolCall
from generators import registry
from generators.base import Cancelled, GenerationError, MediaKind, RequestError
from generators.tools import TOOLS

log = logging.getLogger(__name__)


class NoBackend(RequestError):
    """No backend for the task is available here; the message says what to set (HTTP 503)."""


class Generators:
    """The engine's generator instances (one per backend, loaded on first use)."""

    def __init__(self, config, extras=()) -> None:
        self.config = config
        self.extras = list(extras)  # engine-owned backends (the voice), tried before the registry's
        self._made: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def _options(self, entry) -> dict:
        """Settings for a backend that takes a model (its entry names the config field): the
        model, and quantization on the gpu profile."""
        model = vars(self.config.generators).get(entry.config_field, "") if entry.config_field else ""
        if not model:
            return {}
        quant = self.config.generators.quantization
        return {"model": model, **({"quantize": quant} if quant != "none" and model != "tiny" else {})}

    def available(self, entry) -> tuple[bool, str]:
        model = self._options(entry).get("model")
        return entry.available(model=model) if model else entry.available()

    def _scan(self, task: str) -> tuple[list, list[str]]:
        """(available entries in order of preference, "name: why not" for the others)."""
        registry.load_backends()
        ready, reasons = [], []
        for entry in [e for e in self.extras if e.task == task] + registry.entries(task):
            ok, why = self.available(entry)
            if ok:
                ready.append(entry)
            else:
                reasons.append(f"{entry.name}: {why}")
        return ready, reasons

    def task_status(self, task: str) -> tuple[bool, str]:
        """(available, detail) with this engine's configured models: the backends that can
        serve `task`, or why none can and what to set."""
        ready, reasons = self._scan(task)
        if ready:
            return True, ", ".join(e.name for e in ready)
        return False, "; ".join(reasons) or f"no {registry.TASKS.get(task, task)} backend is built in"

    def setup_hint(self, task: str) -> str:
        """One plain sentence on what `task` is missing here and the one thing that adds it
        (the detail is the status panel's)."""
        from generators.diffusion import DiffusionBackend

        for entry in [e for e in self.extras if e.task == task] + registry.entries(task):
            if isinstance(entry.factory, type) and issubclass(entry.factory, DiffusionBackend):
                return entry.factory.setup_hint(self._options(entry).get("model"))
        return f"{registry.TASKS[task].capitalize()} is not available here; the Status panel says what to set."

    def pick(self, task: str, request: dict, inputs: list[Path]):
        """The backend for this request: the first available one that says it can do it,
        else the first available one (its error then says what it can do). None available:
        RequestError with a plain sentence for the user; the detail goes to the log."""
        ready, reasons = self._scan(task)
        if not ready:
            log.warning("no %s backend: %s", registry.TASKS[task], "; ".join(reasons) or "none is built in")
            raise NoBackend(self.setup_hint(task))
        for entry in ready:
            backend = self.get(entry)
            if backend.can_do(request, inputs):
                return backend
        return self.get(ready[0])

    def get(self, entry):
        with self._lock:
            key = (entry.task, entry.name)
            if key not in self._made:
                self._made[key] = entry.factory(**self._options(entry))
            return self._made[key]

    def only(self, backend) -> None:
        """Keep one resident pipeline: unload the others before `backend` loads (on one GPU
        they would not fit together)."""
        with self._lock:
            for other in self._made.values():
                if other is not backend and other.resident and backend.resident:
                    other.unload()

    def close(self) -> None:
        for backend in self._made.values():
            backend.unload()
        self._made.clear()


def backend_for(engine, task: str, request: dict, inputs: list[Path]):
    """The backend that will run this request, with room made for it: the one way every edge
    (a chat turn, /v1/images, the CLI) gets a generator. A diffusion pipeline stays the only
    one resident and the LLM gives it GPU room first. Raises NoBackend / RequestError."""
    backend = engine.generators.pick(task, request, inputs)
    engine.generators.only(backend)
    if backend.resident:
        make_room_for_diffusion(engine)
    return backend


def run(engine, plan, cancel: CancelToken) -> Generator[Event, None, tuple[str, list, str]]:
    """Run `plan` (engine.tools.plan.ToolPlan). Yields ToolCall, Progress and MediaResult events;
    returns (answer text, stored MediaRecords, status)."""
    yield ToolCall(plan.name, plan.arguments)
    try:
        backend = backend_for(engine, TOOLS[plan.name].task, plan.arguments, [Path(r.path) for r in plan.inputs])
    except GenerationError as exc:
        return without_paths(str(exc)), [], "error"
    events: queue.Queue = queue.Queue()
    outcome: dict = {}
    with tempfile.TemporaryDirectory(prefix="omni-gen-") as tmp:
        def work() -> None:
            try:
                outcome["result"] = backend.run(dict(plan.arguments), [Path(r.path) for r in plan.inputs],
                                                Path(tmp), lambda stage, f: events.put(Progress(stage, float(f))),
                                                cancel)
            except BaseException as exc:  # reported below, whatever it is
                outcome["error"] = exc
            finally:
                events.put(None)

        thread = threading.Thread(target=work, name=f"gen-{backend.name}", daemon=True)
        thread.start()
        while (event := events.get()) is not None:
            yield event
        thread.join()
        if "error" in outcome:
            return _failure(outcome["error"], backend.name), [], "interrupted" if cancel.cancelled else "error"
        result = outcome["result"]
        paths = [result.path, *[p for p in result.meta.get("frames", []) if p != result.path]]
        records = []
        stem = readable_name(plan, result.meta)
        for i, path in enumerate(paths):
            number = f"-{i + 1}" if len(paths) > 1 else ""
            records.append(media_mod.ingest(path, engine.media_dir, 1 << 34, f"{stem}{number}{Path(path).suffix}"))
    meta = {k: v for k, v in result.meta.items() if k != "frames"}
    for rec in records:
        yield MediaResult(rec.kind, rec.path, {**meta, "backend": backend.name, "name": rec.name,
                                               "tool": plan.name})
    what = MediaKind(records[0].kind).noun if records else "result"
    detail = _describe(meta)
    count = f"{len(records)} {what}s" if len(records) > 1 else f"the {what}"
    return f"Here is {count}, made with {backend.name}{f' ({detail})' if detail else ''}.", records, "complete"


# words that name no subject: left out of file names made from a prompt
FILLER = {"an", "the", "me", "my", "please", "some", "it", "its", "this", "that", "make", "draw", "paint", "create",
          "generate", "show", "give", "picture", "image", "photo", "video", "clip", "model", "3d", "can", "you",
          "could", "would", "want", "like", "now"}


def readable_name(plan, made: dict | None = None) -> str:
    """A file name (without extension) for what `plan` makes, from the request: the input's
    name and what was done to it ("lighthouse-crop"), else the prompt's words
    ("lighthouse-at-dusk"); the tool's name when the request has no words to use. `made`:
    the result's meta, whose operations say what was done when the request was in words."""
    args, made = plan.arguments, made or {}
    ops = made.get("operations") or args.get("operations") or []
    done = [str(op["op"]) for op in ops if isinstance(op, dict) and op.get("op")]
    done = done or [str(args.get("operation") or made.get("operation") or "")]
    done = [d for d in done if d]
    prompt = str(args.get("prompt") or args.get("instruction") or "").lower().replace("_", " ")
    words = [w for w in re.findall(r"[a-z0-9]+", prompt) if w not in FILLER and len(w) > 1]
    source = [Path(plan.inputs[0].name).stem.lower()] if plan.inputs else []
    parts = re.findall(r"[a-z0-9]+", " ".join([*source, *(dict.fromkeys(done) or words)]).replace("_", " "))
    name = ""
    for part in parts:  # whole words, at most 60 characters
        if len(name) + len(part) + 1 > 60:
            break
        name = f"{name}-{part}" if name else part
    return name or plan.name.replace("_", "-")


def make_room_for_diffusion(engine) -> int:
    """The LLM and the diffusion generators share one GPU: before a pipeline loads, the LLM
    gives its room (offloaded experts leave the cache; a model wholly on the GPU moves to
    CPU memory) and takes it back when it runs again. Returns the bytes freed."""
    llm = engine.roles["llm"].loaded
    if llm is None:
        return 0
    with engine.model_use():
        return llm.park()


def _describe(meta: dict) -> str:
    ops = meta.get("operations")
    if ops:
        def one(op: dict) -> str:
            detail = op.get("aspect") or (f"'{op['text']}'" if op.get("text") else "") or op.get("color") \
                or op.get("direction") or op.get("amount") or ""
            return f"{op.get('op', '')} {detail}".strip()
        return ", ".join(one(op) for op in ops)[:200]
    bits = []
    if "width" in meta and "height" in meta:
        bits.append(f"{meta['width']}x{meta['height']}")
    if meta.get("duration_s"):
        bits.append(f"{float(meta['duration_s']):.1f} s")
    if meta.get("operation"):
        bits.insert(0, str(meta["operation"]).replace("_", " "))
    return ", ".join(bits)


def _failure(exc: BaseException, backend: str) -> str:
    """The chat's sentence for a failed run: the reason without server paths (the log has it whole)."""
    if isinstance(exc, (RequestError, Cancelled)):  # a refusal or a stop, not a fault: no traceback
        log.info("the %s generator did not run: %s", backend, exc)
    else:
        log.warning("the %s generator failed", backend, exc_info=exc)
    return without_paths(_reason(exc, backend))


def _reason(exc: BaseException, backend: str) -> str:
    if isinstance(exc, Cancelled):
        return "Stopped: the generation was cancelled; nothing was made."
    if isinstance(exc, RequestError):
        return f"I can't do that as asked: {exc}"
    if isinstance(exc, GenerationError):
        return f"The {backend} generator failed: {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return f"The {backend} generator ran out of memory; try a smaller size or a shorter clip."
    return f"The {backend} generator crashed ({type(exc).__name__}: {str(exc)[:200]}); nothing was changed."
