#!/usr/bin/env python3
"""Serving many at once: our continuous batching against llama.cpp's, on the same GGUF, in one run.

 (a) engine level: aggregate decode tok/s with 1, 2, 4, 8 and 16 sequences decoding together
     (greedy, the same prompt in every slot), ours (FastLM.step: one batched C call per
     step) beside `llama-batched-bench` (S_TG, same threads, same prompt length);
 (b) prompt processing: tokens/s for 128- and 512-token prompts, ours (q8_gemm, cold
     slot) beside `llama-bench -p 128,512`; and the app prompt's cold first token;
 (c) server level: N closed-loop HTTP clients (default 20) streaming 48-token answers for
     `--seconds` each against our app at --max-parallel 8, 1 and N (a slot per client), and against
     `llama-server --parallel 8` on the same GGUF: p50/p95 time to first token, p50/p95
     inter-token gap, answers/s, errors; the app's peak RSS while every slot is busy.
llama.cpp's programs are built from the llama-cpp-python sdist's sources for this CPU
(bench/llamacpp_bins.py, cached). Prints one JSON object as its last line and writes
bench/results/serving.json.

    python bench/serving.py [--seconds 120] [--clients 20] [--skip-server]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

BATCHES = (1, 2, 4, 8, 16)
STEPS = 48  # decode steps timed per batch size
PP_TOKENS = 128  # the prompt in every slot before decoding (llama-batched-bench's -npp)
THREADS = os.cpu_count() or 2
DATA = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni-assistant" / "bench-serving"
QUESTIONS = ["What is the capital of France?", "Tell me a fun fact about the moon.", "How do plants make food?",
             "Why is the sky blue?", "Name three famous painters.", "What should I cook tonight?",
             "How far away is the sun?", "Who wrote Romeo and Juliet?", "Recommend a good book.",
             "Explain what a CPU does.", "Write a haiku about rain.", "What is the largest ocean?"]
SYSTEM = "You are a helpful assistant."


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(float(values[min(len(values) - 1, int(round(q * (len(values) - 1))))]), 1)


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    return {"cpu": name, "cores": os.cpu_count(), "machine": platform.machine(),
            "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16") if f in flags]}


# ---- (a) and (b): the engine --------------------------------------------------------------
def engine_level(cfg, tokenizer_prompt: list[int]) -> dict:
    import torch

    from engine.llm import load_backend

    llm = load_backend(replace(cfg.llm, max_parallel=max(BATCHES)), cfg.data_path / "models")
    fast = llm.fast
    out = {"model": llm.name, "decode_path": llm.decode_path, "decode": {}, "prompt": {}}
    llm.scheduler.close()  # (this bench drives the FastLM itself)
    with torch.inference_mode():
        for n in (128, 512):  # prompt processing, cold
            ids = (tokenizer_prompt * (n // len(tokenizer_prompt) + 1))[:n]
            times = []
            for _ in range(3):
                fast.crop(0, 0)
                t = time.perf_counter()
                fast.forward(ids, 0)
                times.append(time.perf_counter() - t)
            out["prompt"][str(n)] = {"tok_s": round(n / statistics.median(times), 1),
                                     "ms": round(1000 * statistics.median(times), 1)}
        ids = (tokenizer_prompt * (PP_TOKENS // len(tokenizer_prompt) + 1))[:PP_TOKENS]
        fast.crop(0, 0)
        fast.forward(ids, 0)
        for b in BATCHES:
            slots = list(range(b))
            for s in slots:
                fast.copy_prefix(0, s, PP_TOKENS)
            tokens = [int(ids[-1])] * b
            fast.step(slots, tokens)  # (warm)
            t = time.perf_counter()
            for _ in range(STEPS):
                logits = fast.step(slots, tokens)
                tokens = logits.argmax(-1).tolist()
            dt = time.perf_counter() - t
            out["decode"][str(b)] = {"aggregate_tok_s": round(b * STEPS / dt, 1),
                                     "step_ms": round(1000 * dt / STEPS, 1)}
            print(f"ours B={b}: {out['decode'][str(b)]}", file=sys.stderr, flush=True)
    llm.close()
    return out


def agreement(cfg) -> dict:
    """Greedy top-1 agreement of decode steps with int8 activations against fp32 ones,
    teacher-forced over bench/agreement.txt and the quality prompts (the text in one slot, a
    companion in the other, so every step is a batch of two)."""
    import torch

    from engine.llm import load_backend

    llm = load_backend(replace(cfg.llm, max_parallel=2), cfg.data_path / "models")
    llm.scheduler.close()
    fast = llm.fast
    text = (ROOT / "bench" / "agreement.txt").read_text()
    items = json.loads((ROOT / "bench" / "quality_items.json").read_text())
    ids = llm.tokenizer(text, add_special_tokens=False).input_ids
    for item in items:
        ids += llm.encode([{"role": "user", "content": item["turns"][0]}])
    ids = ids[:min(len(ids), llm.context_tokens - 1, 1500)]
    tops = {}
    with torch.inference_mode():
        for mode in ("fp32", "int8"):
            fast.x8 = fast.decoder.model.x8 = {"fp32": 0, "int8": 1}[mode]
            fast.crop(0, 0), fast.crop(0, 1)
            top = []
            for t in ids:
                logits = fast.step([0, 1], [t, 7])
                top.append(int(logits[0].argmax()))
            tops[mode] = top
    llm.close()
    out = {"tokens": len(ids)}
    for mode in ("int8",):
        out[f"{mode}_top1_agreement"] = round(sum(a == b for a, b in zip(tops["fp32"], tops[mode])) / len(ids), 4)
    return out


def llama_batched(bins: dict, gguf: Path) -> dict:
    cmd = [str(bins["llama-batched-bench"]), "-m", str(gguf), "-c", str((PP_TOKENS + STEPS + 8) * max(BATCHES)),
           "-b", "2048", "-ub", "512", "-npp", str(PP_TOKENS), "-ntg", str(STEPS), "-npl",
           ",".join(map(str, BATCHES)), "-t", str(THREADS), "-tb", str(THREADS)]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            b = int(cells[2])
            out[str(b)] = {"aggregate_tok_s": float(cells[7]), "prompt_tok_s": float(cells[5])}
    return {"command": " ".join(cmd[1:]), "decode": out}


def llama_bench(bins: dict, gguf: Path) -> dict:
    cmd = [str(bins["llama-bench"]), "-m", str(gguf), "-p", "128,512", "-n", "0", "-t", str(THREADS), "-o", "json",
           "-r", "3"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout)
    return {str(r["n_prompt"]): {"tok_s": round(r["avg_ts"], 1)} for r in rows if r.get("n_prompt")}


# ---- (c): servers --------------------------------------------------------------------------
def stop(proc) -> None:
    """End a server this bench started: asked first, killed if it has not gone in 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, ours: bool, limit_s: float = 600) -> None:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            if ours:
                r = httpx.get(url + "/v1/status", timeout=5).json()
                if r["roles"]["llm"]["state"] == "ready":
                    return
            elif httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(1)
    raise RuntimeError("the server did not become ready")


def load(url: str, clients: int, seconds: float, rss_of=None) -> dict:
    """`clients` closed-loop clients streaming 48-token answers for `seconds`."""
    import httpx

    ttft, gaps, errors, done = [], [], [], [0]
    rss = [0.0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            k = 0
            while time.monotonic() < stop:
                body = {"model": "default", "max_tokens": 48, "temperature": 0.0, "stream": True,
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": QUESTIONS[(i + k) % len(QUESTIONS)]}]}
                k += 1
                t0 = time.monotonic()
                last, first = None, None
                try:
                    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}")
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            delta = json.loads(line[6:])["choices"][0]["delta"] if json.loads(line[6:]).get(
                                "choices") else {}
                            if not delta.get("content"):
                                continue
                            now = time.monotonic()
                            with lock:
                                if first is None:
                                    first = now
                                    ttft.append(1000 * (now - t0))
                                else:
                                    gaps.append(1000 * (now - last))
                            last = now
                    with lock:
                        done[0] += 1
                except Exception as exc:  # noqa: BLE001 (counted)
                    with lock:
                        errors.append(str(exc)[:200])

    def sample() -> None:
        while time.monotonic() < stop:
            if rss_of is not None:
                rss[0] = max(rss[0], rss_of())
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=sample)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t
    return {"clients": clients, "seconds": round(wall, 1), "answers": done[0],
            "answers_per_s": round(done[0] / wall, 3),
            "ttft_ms": {"p50": pct(ttft, 0.5), "p95": pct(ttft, 0.95)},
            "inter_token_ms": {"p50": pct(gaps, 0.5), "p95": pct(gaps, 0.95)},
            "tok_s_streamed": round((len(gaps) + len(ttft)) / wall, 1),
            "errors": len(errors), "error_samples": errors[:3],
            "peak_rss_mb": round(rss[0] / 1e6, 1) if rss_of is not None else None}


def rss_of(pid: int):
    import psutil

    proc = psutil.Process(pid)
    return lambda: proc.memory_info().rss


def serve_ours(parallel: int, clients: int, seconds: float) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "run_app.py", "--profile", "cpu", "--data-dir", str(DATA),
                             "--port", str(port), "--max-parallel", str(parallel), "--max-queue", "64"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, ours=True)
        time.sleep(3)
        out = load(url, clients, seconds, rss_of(proc.pid))
        import httpx

        out["status_serving"] = httpx.get(url + "/v1/status").json()["model"].get("serving")
        return out
    finally:
        stop(proc)


def serve_llama(bins: dict, gguf: Path, parallel: int, clients: int, seconds: float) -> dict:
    port = free_port()
    proc = subprocess.Popen([str(bins["llama-server"]), "-m", str(gguf), "--parallel", str(parallel),
                             "-c", str(2048 * parallel), "-t", str(THREADS), "-tb", str(THREADS),
                             "--host", "127.0.0.1", "--port", str(port), "--cont-batching"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, ours=False)
        return load(url, clients, seconds, rss_of(proc.pid))
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()

    from engine.config import load_config
    from engine.llm.sources import resolve

    cfg = load_config("cpu", overrides={"data_dir": str(DATA)}, env={})
    source = resolve(cfg.llm.model, cfg.data_path / "models", cfg.llm.sha256)
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": cpu(), "threads": THREADS,
              "gguf": source.path.name}
    from engine.llm import load_backend

    probe = load_backend(replace(cfg.llm, max_parallel=1), cfg.data_path / "models")
    prompt = probe.encode([{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}])
    probe.close()
    result["ours"] = engine_level(cfg, prompt)
    result["int8_activations_vs_fp32"] = agreement(cfg)
    print(f"agreement: {result['int8_activations_vs_fp32']}", file=sys.stderr, flush=True)
    bins = None
    if not args.skip_llamacpp:
        import llamacpp_bins

        bins = llamacpp_bins.binaries()
        if bins is None:
            print("building llama.cpp (once)...", file=sys.stderr, flush=True)
            bins = llamacpp_bins.build()
        result["llama_cpp"] = {"batched_bench": llama_batched(bins, source.path),
                               "prompt": llama_bench(bins, source.path)}
        ratios = {}
        for b, row in result["ours"]["decode"].items():
            ref = result["llama_cpp"]["batched_bench"]["decode"].get(b)
            if ref:
                ratios[b] = round(row["aggregate_tok_s"] / ref["aggregate_tok_s"], 2)
        result["decode_ratio_vs_llama_cpp"] = ratios
        result["prompt_ratio_vs_llama_cpp"] = {n: round(result["ours"]["prompt"][n]["tok_s"] / row["tok_s"], 2)
                                               for n, row in result["llama_cpp"]["prompt"].items()
                                               if n in result["ours"]["prompt"]}
    one = result["ours"]["decode"]["1"]["aggregate_tok_s"]
    result["scaling_vs_one_sequence"] = {b: round(r["aggregate_tok_s"] / one, 2)
                                         for b, r in result["ours"]["decode"].items()}
    if not args.skip_server:
        result["server"] = {"ours_parallel_8": serve_ours(8, args.clients, args.seconds),
                            "ours_parallel_1": serve_ours(1, args.clients, args.seconds),
                            f"ours_parallel_{args.clients}": serve_ours(args.clients, args.clients, args.seconds)}
        if bins is not None:
            result["server"]["llama_server_parallel_8"] = serve_llama(bins, source.path, 8, args.clients, args.seconds)
    out = ROOT / "bench" / "results" / "serving.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
