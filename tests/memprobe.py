"""Run hostile files through ingest + the engine's Perceiver in a child process and measure
what each one costs in memory, so a regression shows up as a failed test rather than as
the OOM killer taking the test machine down.

As a script (one JSON line per file; a file that pushes the child past the limit is
reported as "killed" and ends the child):

    python tests/memprobe.py DATA_DIR LIMIT_MB FILE[::NAME] ...

From a test: `probe(files, tmp_path)` -> [dict(name, outcome, message, facts, data, peak_mb, rss_mb,
warm_rss_mb)] (each file in a fresh thread, as the server's workers run them),
`run_guarded(cmd, limit_mb)` -> a subprocess result with the peak RSS of the child.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Peak:
    """The highest RSS of a process (and its children) seen by a 5 ms sampler since reset()."""

    def __init__(self, pid: int | None = None, limit_mb: float | None = None, on_limit=None) -> None:
        import psutil

        self.proc = psutil.Process(pid or os.getpid())
        self.limit, self.on_limit = limit_mb, on_limit
        self.start = self.high = self.rss()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        """The process's RSS plus its children's (ffmpeg decodes in a child); raises
        psutil.NoSuchProcess once the process itself has gone."""
        import psutil

        total = self.proc.memory_info().rss
        try:
            children = self.proc.children(recursive=True)
        except psutil.Error:
            children = []
        for p in children:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # ended between the listing and the reading
                pass
        return total

    def reset(self) -> None:
        self.start = self.high = self.rss()

    @property
    def peak_mb(self) -> float:
        return (self.high - self.start) / 1e6

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.005):
            try:
                self.high = max(self.high, self.rss())
            except psutil.NoSuchProcess:
                return
            except psutil.Error:  # a zombie, a transient read error: sample again
                continue
            if self.limit is not None and self.peak_mb > self.limit and self.on_limit:
                self.on_limit()
                return

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Guarded:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float
    killed: bool


def run_guarded(cmd: list[str], limit_mb: float = 3000, timeout: float = 180, **kw) -> Guarded:
    """subprocess.run, but the child (with its children) is killed once it grows by `limit_mb`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    peak = Peak(proc.pid, limit_mb, kill)
    peak.start = 0  # a fresh process: count all of it
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        peak.stop()
        if proc.poll() is None:
            proc.kill()
    return Guarded(proc.returncode, out, err, peak.high / 1e6, killed.is_set())


def probe(files: list[tuple[Path, str]], tmp_path: Path, limit_mb: float = 3000, timeout: float = 240) -> list[dict]:
    """Each (path, user's name) through ingest + Perceiver in one child; one dict per file."""
    cmd = [sys.executable, str(Path(__file__)), str(tmp_path / "probe-data"), str(limit_mb)]
    cmd += [f"{p}::{n}" for p, n in files]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows or out.returncode == 0, out.stderr[-3000:]
    return rows


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    data_dir, limit = argv[0], float(argv[1])
    from engine.config import load_config
    from engine.engine import Engine
    from engine.media import ingest

    engine = Engine(load_config("tiny", overrides={"data_dir": data_dir}, env={}))
    current = {"name": ""}

    def over() -> None:
        print(json.dumps({"name": current["name"], "outcome": "killed", "peak_mb": limit}), flush=True)
        os._exit(3)

    sys.path.insert(0, str(ROOT / "tests"))
    import hostile

    warm = Path(data_dir) / "warm"
    warm.mkdir(parents=True, exist_ok=True)
    for name, data in (("w.png", hostile.png(64, 48)), ("w.avi", hostile.originals()[".avi"])):
        (warm / name).write_bytes(data)  # load the models before measuring
        engine.perceiver.perceive(ingest(warm / name, engine.media_dir, 10**8))
    peak = Peak(limit_mb=limit, on_limit=over)
    warm_rss = peak.rss()
    for spec in argv[2:]:
        path, _, name = spec.partition("::")
        current["name"] = name
        peak.reset()
        row: dict = {"name": name}
        t = time.perf_counter()
        worker = threading.Thread(target=_look, args=(engine, path, name, row))  # as the server's workers do
        worker.start()
        worker.join()
        row.update(peak_mb=round(peak.peak_mb, 1), seconds=round(time.perf_counter() - t, 2),
                   rss_mb=round(peak.rss() / 1e6, 1), warm_rss_mb=round(warm_rss / 1e6, 1))
        print(json.dumps(row, ensure_ascii=False, default=str), flush=True)
    engine.close()
    return 0


def _look(engine, path: str, name: str, row: dict) -> None:
    from engine.errors import InputError
    from engine.media import ingest

    try:
        rec = ingest(path, engine.media_dir, 10**8, name)
        row.update(outcome="ok", kind=rec.kind, meta=rec.meta)
        if rec.kind in ("image", "audio", "video"):
            p = engine.perceiver.perceive(rec)
            row.update(facts=p.facts, data=_plain(p.data))
    except InputError as exc:
        row.update(outcome="input_error", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - what the test is looking for
        row.update(outcome="crash", message=f"{type(exc).__name__}: {exc}"[:500])


def _plain(data: dict) -> dict:
    """The perception's data without the bulky parts (keyframe scenes, segments)."""
    return {k: v for k, v in data.items() if k in ("size", "skipped", "ocr", "faces", "duration_s", "scene_count")}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
