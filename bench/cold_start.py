#!/usr/bin/env python3
"""A cold start against a warm one: the cpu profile's server, its RSS and its time to a first answer.

A cold start is the first on a new data dir: the GGUF joined from its packaged parts and
hash-checked, its tokenizer converted, its int8 codes made, the C kernel compiled. A warm
start is the second on the same dir, reading all of that back. Both should leave the server
at the same RSS: what the one-time work allocates is not needed once its files are written.

    python bench/cold_start.py [--label after] [--steps] [--keep]

Starts `run_app.py --profile cpu` on a fresh data dir (nothing converted: the model comes
from its installed part packages, as on a new machine), waits for a chat answer, records
the server's RSS then and once every role has loaded, stops it, and does the same again on
that dir (warm). `--steps`: also the RSS of one process around each step of a cold load,
run in-process (the steps' own functions, in a child of this script), to see which step
leaves memory behind. Writes bench/results/cold_start.json (the run under `--label`; other
labels already in the file are kept) and prints the run as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "results" / "cold_start.json"


def memory(pid: int | str = "self") -> dict:
    """RSS of a process and its parts (MB), from /proc/PID/smaps_rollup: anonymous memory (what
    a conversion leaves behind) and file pages (a mapped GGUF's, the libraries')."""
    wanted = {"Rss": "rss_mb", "Anonymous": "anon_mb", "Pss_File": "file_mb"}
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[wanted[key]] = round(int(value.split()[0]) / 1024, 1)
    return out


def ask(url: str) -> str:
    import httpx

    body = {"model": "default", "max_tokens": 16, "temperature": 0.0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def settled(url: str, limit_s: float = 300) -> bool:
    """Wait until no role is still loading (the voice roles load after the language model)."""
    import httpx

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        roles = httpx.get(url + "/v1/status", timeout=30).json()["roles"]
        if not any(r["state"] == "loading" for r in roles.values()):
            return True
        time.sleep(1)
    return False


def serve_once(data: Path, log_name: str) -> dict:
    """Start the cpu profile's server on `data`, ask one question, measure, stop it."""
    from serving import free_port, stop, wait_ready
    from tests.memprobe import Peak

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(data / log_name, "w") as log:
        proc = subprocess.Popen([sys.executable, "run_app.py", "--profile", "cpu", "--data-dir", str(data),
                                 "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    peak = None
    try:
        peak = Peak(proc.pid)  # the server and any child it starts (a conversion's), sampled every 5 ms
        peak.start = 0
        wait_ready(url, proc, ours=True, limit_s=900)
        answer = ask(url)
        first = time.monotonic() - started
        at_answer = memory(proc.pid)
        all_loaded = settled(url)
        time.sleep(5)  # (a last role's load finishing its allocations)
        return {"seconds_to_first_answer": round(first, 1), "answer": answer.strip()[:80],
                "rss_at_first_answer": at_answer, "rss_settled": memory(proc.pid), "all_roles_loaded": all_loaded,
                "peak_tree_rss_mb": round(peak.high / 1e6, 1)}
    finally:
        if peak is not None:
            peak.stop()
        stop(proc)


STEPS = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from cold_start import memory
rows, started = [], time.monotonic()
def mark(step):
    rows.append({"step": step, "s": round(time.monotonic() - started, 1), **memory()})
mark("python")
import torch
mark("import torch")
from engine.config import load_config
from engine.llm import lean
from engine.llm.fastpath import FastLM
from engine.llm.kernels import q8
from engine.llm.loading import gguf_tokenizer_dir
from engine.llm.sources import resolve
cfg = load_config("cpu", overrides={"data_dir": sys.argv[1]}, env={}).llm
models = Path(sys.argv[1]) / "models"
source = resolve(cfg.model, models, cfg.sha256)
mark("join the parts, check the sha256")
from engine.llm.gguf_blocks import GgufFile
gguf_tokenizer_dir(source, models, GgufFile.open(source.path).config())
mark("convert the tokenizer (transformers)")
checkpoint = lean.open_source(source, models)
mark("open the checkpoint (lean)")
lib = q8.load(models / "kernels")
mark("compile the kernel")
fast = FastLM(checkpoint.weights(), cfg.context_tokens, int8=lib, codes_path=lean.codes_path(checkpoint.folder),
              slots=cfg.max_parallel)
mark("make and write the int8 codes")
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
mark("gc + malloc_trim (what the allocator kept)")
print(json.dumps(rows))
"""


def steps(data: Path) -> list[dict]:
    """RSS after each step of a cold load, in one fresh process (the steps run where they are)."""
    out = subprocess.run([sys.executable, "-c", STEPS, str(data), str(ROOT / "bench")], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from serving import cpu

    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="after", help="the key this run is stored under in the results file")
    ap.add_argument("--steps", action="store_true", help="also the RSS around each step of a cold load")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs (printed)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cold-start-"))
    run = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": {**cpu(), "load_avg_1m": os.getloadavg()[0]},
           "command": "python bench/cold_start.py " + " ".join(sys.argv[1:])}
    try:
        data = root / "data"
        data.mkdir()
        run["cold"] = serve_once(data, "cold.log")
        print(f"cold: {run['cold']}", file=sys.stderr, flush=True)
        run["warm"] = serve_once(data, "warm.log")
        print(f"warm: {run['warm']}", file=sys.stderr, flush=True)
        run["cold_minus_warm_settled_rss_mb"] = round(run["cold"]["rss_settled"]["rss_mb"]
                                                      - run["warm"]["rss_settled"]["rss_mb"], 1)
        if args.steps:
            (root / "steps").mkdir()
            run["cold_load_steps_in_one_process"] = steps(root / "steps")
    finally:
        if args.keep:
            print(f"data dirs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[args.label] = run
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
