#!/usr/bin/env python3
"""Issue 25's figures in one file: hostile input through every door, the memory of one request,
a soak, and SIGKILLs while conversations stream.

Each part runs as its own process (so one part's memory or a hang cannot colour the next) and
its figures are merged into bench/results/reliability.json under the part's name, with the
command, the machine and the date; a part can be run again alone (`--only soak`) and the
others' figures stay. The README's "Limits and safety" section quotes this file.

- fuzz:   tests/test_doors.py with OMNI_FUZZ=each: every one of the hostile inputs of
          tests/hostile.py once, through the doors that take its kind in turn, and every door
          (a 2xx or a clear 4xx naming the part, 0 5xx, 0 tracebacks, a plain chat after);
- memory: tests/test_memory_budget.py's three big requests (a 7999x7999 RGBA PNG, an 8000x8000
          video, two minutes of MP3): peak RSS growth of each against the default budget;
- soak:   bench/soak.py (20 clients for 10 minutes on the cpu profile by default);
- kill:   bench/kill.py (100 SIGKILLs on the cpu profile by default).

    python bench/reliability.py [--only fuzz,memory,soak,kill] [--clients 20] [--seconds 600]
                                [--kills 100] [--profile cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui import machine  # noqa: E402 - bench/ui.py, beside this file

OUT = ROOT / "bench" / "results" / "reliability.json"
PARTS = ("fuzz", "memory", "soak", "kill")


def pytest_part(node: str, report_var: str, env: dict, limit_s: float) -> dict:
    """Run one test with its report file asked for; its figures, and whether the test passed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
               "-o", f"timeout={int(limit_s)}", node]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, report_var: str(report)},
                              capture_output=True, text=True, timeout=limit_s + 120)
        figures = json.loads(report.read_text()) if report.exists() else {}
    return {**figures, "test_passed": done.returncode == 0,
            "command": " ".join([*(f"{k}={v}" for k, v in env.items()), "pytest", node]),
            **({} if done.returncode == 0 else {"output_tail": done.stdout[-3000:]})}


def script_part(script: str, args: list[str], limit_s: float) -> dict:
    """Run bench/<script> writing its JSON to a temporary file; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        figures = json.loads(out.read_text()) if out.exists() else {}
    return {**figures, "exit_code": done.returncode, "command": f"python bench/{script} " + " ".join(args),
            **({} if done.returncode == 0 else {"output_tail": (done.stdout + done.stderr)[-3000:]})}


def run_part(name: str, opts: argparse.Namespace) -> dict:
    if name == "fuzz":
        return pytest_part("tests/test_doors.py::test_hostile_inputs_through_every_door", "OMNI_FUZZ_REPORT",
                           {"OMNI_FUZZ": "each"}, limit_s=3600)
    if name == "memory":
        return pytest_part("tests/test_memory_budget.py::test_each_big_request_stays_within_the_budget",
                           "OMNI_MEMORY_REPORT", {}, limit_s=900)
    if name == "soak":
        return script_part("soak.py", ["--clients", str(opts.clients), "--seconds", str(opts.seconds),
                                       "--profile", opts.profile], limit_s=opts.seconds + 1800)
    return script_part("kill.py", ["--kills", str(opts.kills), "--profile", opts.profile], limit_s=4 * 3600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--out", type=Path, default=OUT)
    opts = ap.parse_args()
    parts = [p.strip() for p in opts.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    result = json.loads(opts.out.read_text()) if opts.out.exists() else {}
    for name in parts:
        started = time.monotonic()
        print(f"[reliability] {name} ...", flush=True)
        figures = run_part(name, opts)
        result[name] = {**figures, "wall_s": round(time.monotonic() - started),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                        "load_1min_after": round(os.getloadavg()[0], 2)}
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=1) + "\n")  # after each part: a later failure keeps it
        print(f"[reliability] {name}: {json.dumps(figures)[:600]}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
