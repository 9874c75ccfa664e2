#!/usr/bin/env python3
"""The gpu profile's claims, measured in one run on a lent GPU (issue 16).

On a session that is lent a GPU, run this FIRST, as one call of the device tool
(after `make gpu-wheels` here; the wheels travel in the ignored .whl/):

    run(command="python3 bench/gpu_check.py --out $OUT", carry=[".whl"], timeout_s=600)

then `give_back`, and record the figures (README, GPU section). A step that failed
can be rerun alone while the machine is still warm: add `--only moe,omni`.

Steps, in order, each in its own process under its own time cap (all of them
within --deadline-s), each writing <out>/<step>.json; a failing or timed-out
step does not stop the next:
  install    the .whl/ wheels into a temporary --target, without network
             (bitsandbytes, diffusers, transformers 5.24: see bench/gpu_wheels.py)
  pytest     `pytest -m gpu` on every test file that has gpu-marked tests
  moe        bench/moe.py: Qwen3-30B-A3B shape, NF4 experts, our expert cache vs
             accelerate's device_map offload at 8 and 16 GB of VRAM
  omni       bench/omni.py: the Qwen2.5-Omni-3B-shaped backbone in 4-bit with an
             image in the prompt, and the GPU hand-off to a diffusion pipeline and back
  diffusion  bench/diffusion.py: one fp16 run of each diffusion pipeline at its
             real architecture size (random weights)
<out>/summary.json lists every step's status (ok, failed, timed_out, skipped),
wall time and key figures; <out>/log.txt has every step's output. Eight files at
most come back from the device's $OUT: summary.json, log.txt and one JSON per step.

Without CUDA (this machine, CI) every CUDA step is skipped with the reason and
the script exits 0: `make gpu-check` is then a dry run of the plumbing
(tests/test_gpu_check.py runs it so).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# step -> time cap in seconds; the sum stays inside one 10-minute device call with room to spare
CAPS = {"install": 40, "pytest": 100, "moe": 200, "omni": 100, "diffusion": 100}
DEADLINE_S = 560  # the whole run; the device call's limit is 600
LOG_TAIL = 200_000  # characters of each step's output kept in log.txt
BENCH_ARGS = {  # the bench steps' commands; `{out}` is the step's JSON
    "moe": ["bench/moe.py", "--runs", "1", "--decode-steps", "8", "--out", "{out}"],  # 3 models built, 5 columns
    "omni": ["bench/omni.py", "--out", "{out}"],
    "diffusion": ["bench/diffusion.py", "--out", "{out}"],
}
CPU_ARGS = {"diffusion": ["--tiny"]}  # --force-cpu: real-size pipelines would take an hour on a CPU


def say(line: str) -> None:
    print(f"[gpu-check] {line}", flush=True)


def probe(env: dict) -> dict:
    """torch and CUDA as the steps will see them (a child, so this process holds no CUDA context)."""
    code = ("import json, sys\n"
            "try:\n    import torch\nexcept Exception as e:\n"
            "    print(json.dumps({'torch': None, 'why': f'{type(e).__name__}: {e}'})); sys.exit()\n"
            "ok = torch.cuda.is_available()\n"
            "print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'cuda': ok,\n"
            "  'device': torch.cuda.get_device_name(0) if ok else None,\n"
            "  'vram_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if ok else None}))\n")
    try:
        done = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
        return {"torch": None, "why": f"probing torch failed: {type(exc).__name__}"}


def run_step(name: str, cmd: list[str], cap: float, env: dict, log) -> dict:
    """Run `cmd` in its own process group under `cap` seconds; its output goes to the log."""
    say(f"{name}: running (cap {cap:.0f} s): {' '.join(cmd[1:])}")
    log.write(f"\n===== {name}: {' '.join(cmd)} (cap {cap:.0f} s)\n")
    log.flush()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=cap)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timed_out"
    wall = round(time.perf_counter() - started, 1)
    log.write(output[-LOG_TAIL:])
    log.write(f"\n===== {name}: {status}, rc {proc.returncode}, {wall} s\n")
    log.flush()
    row = {"status": status, "wall_s": wall, "cap_s": round(cap), "rc": proc.returncode}
    if status != "ok":
        row["error"] = last_error(output) or f"exit code {proc.returncode}"
    return row


def last_error(output: str) -> str:
    """The last line that names an error, or the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception|error:|FAILED|Killed)", ln)]
    return (errors or lines or [""])[-1][:400]


# -- the steps ---------------------------------------------------------------------------------
def install(wheels: Path, site: Path, env: dict, cap: float, log) -> dict:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return {"status": "skipped", "reason": f"no wheels in {wheels} (make gpu-wheels)"}
    cmd = [PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    row = run_step("install", cmd, cap, env, log)
    row["wheels"] = [p.name for p in found]
    if row["status"] == "ok":
        code = ("import bitsandbytes as b, diffusers as d, transformers as t; "
                "print(b.__version__, d.__version__, t.__version__)")
        done = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            row["versions"] = dict(zip(("bitsandbytes", "diffusers", "transformers"), done.stdout.split()))
        else:
            row.update(status="failed", error=last_error(done.stderr))
    return row


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def pytest_step(out: Path, env: dict, cap: float, log) -> dict:
    files = gpu_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        # -v: a line per test as it ends, so a run stopped at the cap still shows how far it got
        cmd = [PY, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
        row = run_step("pytest", cmd, cap, env, log)
        result = {"step": "pytest", "files": files, **junit_summary(xml)}
    if row["status"] == "failed" and result.get("tests") and not (result["failed"] or result["errors"]):
        row["status"] = "ok"  # e.g. exit code 5 style oddities with every test passed or skipped
    out.write_text(json.dumps(result, indent=2) + "\n")
    row["figures"] = {k: result.get(k) for k in ("tests", "passed", "failed", "errors", "skipped")}
    if result.get("failures"):
        row["figures"]["failures"] = [f["test"] for f in result["failures"]]
    return row


def junit_summary(xml: Path) -> dict:
    if not xml.exists():
        return {"tests": 0, "note": "pytest wrote no junit report (crashed or killed before the end)"}
    cases = ET.parse(xml).getroot().iter("testcase")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, durations = [], {}
    for case in cases:
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        durations[test] = round(float(case.get("time") or 0), 2)
        counts["tests"] += 1
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            text = (kinds[tag].get("message") or kinds[tag].text or "").strip()
            failures.append({"test": test, "kind": tag, "message": text[:1500]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            failures_skip = (kinds["skipped"].get("message") or "").strip()
            durations[test] = f"skipped: {failures_skip[:200]}"
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "durations_s": durations}


def bench_step(name: str, out: Path, env: dict, cap: float, log, extra: list[str] = ()) -> dict:
    cmd = [PY, *[a.replace("{out}", str(out)) for a in BENCH_ARGS[name]], *extra]
    row = run_step(name, cmd, cap, env, log)
    try:
        data = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        data = None
    if data is None:
        out.write_text(json.dumps({"step": name, "status": row["status"], "error": row.get("error")}, indent=2) + "\n")
    else:
        row["figures"] = FIGURES[name](data)
        if data.get("partial"):
            row["figures"]["partial"] = True
    return row


def _pick(d: dict | None, *keys):
    return {k: d[k] for k in keys if isinstance(d, dict) and k in d} if isinstance(d, dict) else d


def moe_figures(data: dict) -> dict:
    keys = ("decode_tok_s", "ttft_ms", "peak_mem_mb", "hit_rate", "prefetch_accuracy", "skipped", "error")
    return {col: _pick(data.get(col), *keys) for col in ("ours_budget_a", "accelerate_budget_a", "ours_budget_b",
                                                         "accelerate_budget_b", "no_offload") if col in data} | \
        {"budgets": {k: v.get("total_vram_gib") for k, v in (data.get("budgets") or {}).items()},
         "nf4_dequant": data.get("expert_dtype", "")[-60:]}


def omni_figures(data: dict) -> dict:
    return {"backbone": _pick(data.get("backbone"), "decode_tok_s", "ttft_ms", "image_tokens", "peak_vram_mb",
                              "weights_mb", "error"),
            "handoff": _pick(data.get("handoff"), "freed_mb", "vram_after_park_mb", "pipeline_peak_mb",
                             "vram_after_unload_mb", "restore_s", "same_answer", "error")}


def diffusion_figures(data: dict) -> dict:
    return {name: _pick(res, "step_s", "first_step_s", "run_s", "peak_vram_mb", "weights_mb", "freed_on_unload",
                        "error", "skipped")
            for name, res in (data.get("pipelines") or {}).items()}


FIGURES = {"moe": moe_figures, "omni": omni_figures, "diffusion": diffusion_figures}


# -- the run -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description="Run every gpu check, each step under its own cap.")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-check",
                    help="folder for summary.json, log.txt and one JSON per step (default $OUT)")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheels to install (make gpu-wheels)")
    ap.add_argument("--only", default="",
                    help="comma-separated steps to run (the others are skipped; install always runs)")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="the whole run's time limit")
    ap.add_argument("--force-cpu", action="store_true",
                    help="run the CUDA steps without CUDA too (the gpu tests skip, the benches take their CPU "
                         "shapes, diffusion its tiny pipelines): a slow check of this script, not figures")
    args = ap.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - set(CAPS):
        ap.error(f"--only: unknown step(s) {', '.join(sorted(only - set(CAPS)))}; steps are {', '.join(CAPS)}")
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCHDYNAMO_DISABLE": "1"}
    summary = {"check": "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
               "out": str(out), "steps": {}}
    steps = summary["steps"]

    def cap(name: str) -> float:
        slow = 3 if args.force_cpu and no_cuda else 1
        return max(1.0, min(CAPS[name] * slow, args.deadline_s - (time.perf_counter() - started) - 5))

    def record(name: str, row: dict) -> None:
        steps[name] = row
        tail = row.get("reason") or row.get("error") or ""
        wall = f", {row['wall_s']} s" if "wall_s" in row else ""
        say(f"{name}: {row['status']}{f' ({tail})' if tail else ''}{wall}")
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    summary["env"] = env_info = probe(env)
    no_cuda = ("" if env_info.get("cuda") else
               f"no CUDA device: torch {env_info['torch']}, torch.cuda.is_available() is False"
               if env_info.get("torch") else f"torch is not importable ({env_info.get('why')})")
    say(f"torch {env_info.get('torch')}, CUDA: {env_info.get('device') or 'none'}")
    try:
        with open(out / "log.txt", "w") as log:
            for name in CAPS:
                if only and name not in only and name != "install":  # the others need its wheels
                    record(name, {"status": "skipped", "reason": "not in --only"})
                elif name == "install" and not env_info.get("torch"):
                    record(name, {"status": "skipped", "reason": no_cuda})  # the wheels import torch
                elif name == "install":
                    record(name, install(Path(args.wheels), site, env, cap(name), log))
                elif no_cuda and not args.force_cpu:
                    record(name, {"status": "skipped", "reason": no_cuda})
                elif cap(name) < 10:
                    record(name, {"status": "skipped", "reason": f"the {args.deadline_s:.0f} s deadline is reached"})
                elif name == "pytest":
                    record(name, pytest_step(out / "pytest.json", env, cap(name), log))
                else:
                    extra = CPU_ARGS.get(name, []) if no_cuda else []
                    record(name, bench_step(name, out / f"{name}.json", env, cap(name), log, extra))
    finally:
        shutil.rmtree(site, ignore_errors=True)
    counts = {s: sum(1 for r in steps.values() if r["status"] == s) for s in ("ok", "failed", "timed_out", "skipped")}
    summary["counts"] = counts
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['wall_s']} s: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + f"; {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
