"""A first start's one-time conversions, run in a child process.

The first start on a new data dir joins a split GGUF and checks its hash (engine/llm/sources.py),
converts its tokenizer or the whole model (engine/llm/loading.py) and finds the int8 codes
(engine/llm/fastpath.py); each writes files that every later start reads instead. Making the
codes of the cpu profile's model left the server ~1.7 GB above a warm start's RSS (2.99 GB
against 1.29, bench/cold_start.py): freed tensors that the allocator keeps, and the GGUF's
pages read while coding. So the server's load runs `cached_only`: where a conversion is due it
raises Unconverted (`converting`), the backend has `convert_in_child` make the files in a child
process that then ends, taking its memory with it, and loads again, as a warm start does.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable

from engine.config import LLMConfig
from engine.errors import Unavailable

ROOT = Path(__file__).resolve().parents[2]
_cached_only: ContextVar[bool] = ContextVar("cached_only", default=False)
# the child's program: the backend's own load, converting where it is (the files the parent reads)
CHILD = """import sys
sys.path.insert(0, {root!r})
from engine.llm.conversion import child

def load(cfg, cache_dir):
    from engine.llm.transformers_backend import TransformersBackend

    TransformersBackend(cfg, cache_dir, convert_here=True).close()

child(load)
"""


class Unconverted(Exception):
    """A load met a one-time conversion while `cached_only` held (it was not run)."""


@contextmanager
def cached_only(refuse: bool = True):
    """Within it (this thread), a one-time conversion raises Unconverted instead of running
    (`refuse=False`: it runs, as it does outside)."""
    token = _cached_only.set(refuse)
    try:
        yield
    finally:
        _cached_only.reset(token)


def converting(what: str) -> None:
    """Called where a one-time conversion is about to start: refused within `cached_only`."""
    if _cached_only.get():
        raise Unconverted(what)


def convert_in_child(cfg: LLMConfig, cache_dir: Path) -> None:
    """Load `cfg`'s model once in a child process (`sys.executable -c`: a new interpreter, not
    a fork of this many-threaded server), so that its one-time conversions write their files
    there and their memory ends with the child. An error in the child is raised here as it was
    raised there: Unavailable(why, what to set), an OSError with its errno (a full disk), a
    builtin exception with its arguments. The files are written under temporary names and
    renamed when whole, so a child stopped half-way (the server killed: the child ends when it
    sees it) leaves nothing a later start reads."""
    import json
    import subprocess
    import sys
    from dataclasses import asdict

    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps(asdict(cfg)),
                          str(cache_dir), str(os.getpid())],
                         stdout=subprocess.PIPE, text=True)  # (its stderr, the log, goes to this one's)
    if out.returncode == 0:
        return
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"error"')]
    if not lines:
        raise Unavailable(f"the first start's conversion of {cfg.model} ended with code {out.returncode}"
                          + (" (killed: out of memory?)" if out.returncode < 0 else ""),
                          "see the log; free memory or disk space and start again")
    raise rebuilt(json.loads(lines[-1])["error"])


def child(load: Callable[[LLMConfig, Path], None]) -> None:
    """The child's side: argv = the LLMConfig as JSON, the cache dir, the parent's pid. Runs
    `load`; an error goes to the parent as one JSON line on stdout."""
    import json
    import sys
    import threading
    import time

    fields, cache_dir, parent = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

    def watch() -> None:  # the parent gone (killed, stopped): no one waits for these files
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        load(LLMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}), cache_dir)
    except Exception as exc:  # noqa: BLE001 (handed to the parent, which raises it)
        print(json.dumps({"error": described(exc)}), flush=True)
        sys.exit(1)


def described(exc: Exception) -> dict:
    """An exception as JSON, for `rebuilt` in the parent."""
    if isinstance(exc, Unavailable):
        return {"unavailable": [exc.why, exc.what_to_set]}
    if isinstance(exc, OSError) and exc.errno is not None:
        return {"oserror": [exc.errno, exc.strerror, _plain(exc.filename), None, _plain(exc.filename2)]}
    return {"type": type(exc).__name__, "args": [_plain(a) for a in exc.args], "message": str(exc)}


def rebuilt(error: dict) -> Exception:
    """The exception `described` gave: the same type and message (a builtin type; another is
    a RuntimeError naming it)."""
    import builtins

    if "unavailable" in error:
        return Unavailable(*error["unavailable"])
    if "oserror" in error:
        return OSError(*error["oserror"])  # (the errno's subclass: FileNotFoundError, ...)
    cls = getattr(builtins, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, OSError):
        try:
            return cls(*error["args"])
        except TypeError:  # (arguments that did not survive JSON)
            pass
    return RuntimeError(f"{error['type']}: {error['message']}")


def _plain(value):
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
