#!/usr/bin/env python3
"""Text speed: our engine vs plain `model.generate()` vs llama.cpp, same run.

Same weights (the cpu profile's SmolLM2-135M), same prompt, greedy, same
number of new tokens, runs interleaved and the median taken. Then start the
real app twice (cold: fresh data dir, GGUF converted; warm: cached) and time
the page and the first streamed token, sampling the server's RSS.
Prints one JSON object as its last line and writes bench/results/text.json.

    python bench/text.py [--runs 3] [--tokens 128] [--skip-start]
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
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def ours(backend, params, tokens):
    from engine.events import CancelToken

    backend.forget()  # a cold prompt, like plain generate() gets
    start = time.perf_counter()
    first = None
    gen = backend.generate(PROMPT, (), params, CancelToken())
    while True:
        try:
            next(gen)
            first = first or time.perf_counter()
        except StopIteration as stop:
            usage = stop.value
            break
    end = time.perf_counter()
    n = usage["completion_tokens"]
    return {"n": n, "ttft_ms": (first - start) * 1000, "decode_tok_s": (n - 1) / (end - first),
            "e2e_tok_s": n / (end - start)}


def plain(backend, n):
    start = time.perf_counter()
    out = backend.plain_generate(PROMPT, n)
    end = time.perf_counter()
    assert len(out) == n
    return {"e2e_tok_s": n / (end - start)}


def llamacpp(gguf: Path, prompt_text: str, n: int, runs: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        out = llm.create_completion(prompt_text, max_tokens=n, temperature=0.0)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    return statistics.median(rates)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: str) -> dict:
    """Launch `run_app.py --profile cpu`; time the page and the first streamed token."""
    import httpx
    import psutil

    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "run_app.py", "--profile", "cpu", "--data-dir", data_dir,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, stop = [0], threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        page = None
        while page is None and time.perf_counter() - started < 300:
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    page = time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.05)
        body = {"model": "x", "messages": PROMPT, "stream": True, "max_tokens": 8}
        first = None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    first = first or time.perf_counter() - started
        return {"page_s": page, "first_token_s": first, "peak_rss_mb": peak[0] / 2**20}
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-start", action="store_true", help="skip the cold/warm app start timing")
    args = ap.parse_args()

    import torch

    from engine.config import load_config
    from engine.llm import load_backend
    from engine.llm.base import GenParams
    from engine.llm.sources import resolve

    tmp = tempfile.mkdtemp(prefix="omni-bench-")
    cfg = load_config("cpu", overrides={"data_dir": tmp}, env={})
    t0 = time.perf_counter()
    backend = load_backend(cfg.llm, cfg.data_path / "models")
    load_s = time.perf_counter() - t0
    params = GenParams(max_new_tokens=args.tokens, temperature=0.0)
    ours(backend, params, args.tokens)  # warm-up
    n = ours(backend, params, args.tokens)["n"]
    params = GenParams(max_new_tokens=n, temperature=0.0)
    our_runs, plain_runs = [], []
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        our_runs.append(ours(backend, params, n))
        plain_runs.append(plain(backend, n))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    prompt_text = backend.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    llama = llamacpp(resolve(cfg.llm.model, cfg.data_path / "models").path, prompt_text, n, args.runs)
    import resource

    result = {
        "model": backend.name, "new_tokens": n, "runs": args.runs,
        "ttft_ms": round(med(our_runs, "ttft_ms"), 1),
        "decode_tok_s": round(med(our_runs, "decode_tok_s"), 2),
        "e2e_tok_s": round(med(our_runs, "e2e_tok_s"), 2),
        "plain_generate_tok_s": round(med(plain_runs, "e2e_tok_s"), 2),
        "ratio_vs_generate": round(med(our_runs, "e2e_tok_s") / med(plain_runs, "e2e_tok_s"), 3),
        "llamacpp_tok_s": round(llama, 2) if llama else None,
        "first_load_with_conversion_s": round(load_s, 2),
        "bench_process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }
    if not args.skip_start:
        data = tempfile.mkdtemp(prefix="omni-start-")
        cold, warm = start_app(data), start_app(data)
        result.update({
            "cold_start_page_s": round(cold["page_s"], 2), "cold_start_first_token_s": round(cold["first_token_s"], 2),
            "warm_start_s": round(warm["page_s"], 2), "warm_start_first_token_s": round(warm["first_token_s"], 2),
            "cold_peak_rss_mb": round(cold["peak_rss_mb"], 1), "warm_peak_rss_mb": round(warm["peak_rss_mb"], 1),
            "peak_rss_mb": round(max(cold["peak_rss_mb"], warm["peak_rss_mb"]), 1),
        })
    else:
        result.update({"warm_start_s": None, "peak_rss_mb": result["bench_process_peak_rss_mb"]})
    out = ROOT / "bench" / "results" / "text.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
