#!/usr/bin/env python3
"""Text speed: each of our decode settings vs plain `model.generate()`, llama.cpp and
CTranslate2, in one run, for the cpu profile's model and every other installed candidate.

Per model: the same prompt, greedy, the same number of new tokens, runs interleaved and
the median taken, for `llm.decode` = transformers (its forward in our loop), fp32 (our
fast path) and int8 (fast path, int8 weights), beside `generate()`; llama.cpp on the
model's GGUF when `llama_cpp` is installed (`make llamacpp`), CTranslate2 int8 on the same
weights. A quality guard: greedy top-1 agreement of int8 with fp32, teacher-forced over
bench/agreement.txt and every prompt of bench/quality_items.json in the chat template
(> 2,000 tokens), through transformers' forward on the int8-valued weights and through the
fast path's own decode steps (the C decode step). Then start the real app twice (cold: fresh data dir; warm: cached) and
time the page and the first streamed token, sampling the server's RSS.
Prints one JSON object as its last line and writes bench/results/text.json.

    python bench/text.py [--runs 3] [--tokens 128] [--models smollm2-135m,qwen2.5-coder-0.5b] [--skip-start]
    python bench/text.py --start-only --starts 3   # only the app start, into the last results
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


def new_chat(backend) -> dict:
    """First token of a chat as the app sends it (its system prompt first): cold (nothing
    cached) and as a new chat in a running app, where the system prompt is already in the
    KV cache (primed at load, engine/roles.py; kept from the last chat)."""
    from engine.config import DEFAULT_SYSTEM_PROMPT
    from engine.events import CancelToken
    from engine.llm.base import GenParams

    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    out = {}
    for case in ("cold", "primed"):
        backend.forget()
        if case == "primed":
            backend.prime([system])
        start = time.perf_counter()
        next(backend.generate([system, *PROMPT], (), GenParams(max_new_tokens=2, temperature=0.0), CancelToken()))
        out[case] = (time.perf_counter() - start) * 1000
    return out


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


def app_start(warm_runs: int = 1) -> dict:
    """A cold start (fresh data dir) then `warm_runs` warm ones on the same dir; medians."""
    data = tempfile.mkdtemp(prefix="omni-start-")
    before = os.getloadavg()[0]
    cold = start_app(data)
    warm = [start_app(data) for _ in range(max(1, warm_runs))]
    med = lambda key: round(statistics.median(w[key] for w in warm), 2)  # noqa: E731
    return {"cold_start_page_s": round(cold["page_s"], 2), "cold_start_first_token_s": round(cold["first_token_s"], 2),
            "warm_start_s": med("page_s"), "warm_start_first_token_s": med("first_token_s"),
            "warm_runs": len(warm), "cold_peak_rss_mb": round(cold["peak_rss_mb"], 1),
            "warm_peak_rss_mb": round(max(w["peak_rss_mb"] for w in warm), 1),
            "load_avg_before": before, "load_avg_after": os.getloadavg()[0]}


# llama.cpp's figure when it is not installed in this run: measured on 2026-11-30 on this project's
# 2-core AMD EPYC CI machine (llama-cpp-python, SmolLM2-135M Q4_1, 128 tokens, greedy)
LLAMACPP_RECORDED = {"smollm2-135m": {"tok_s": 172.22, "when": "2026-11-30", "machine": "2-core AMD EPYC (CI)"}}
SETTINGS = ("transformers", "fp32", "int8")


def agreement_ids(tokenizer) -> list[int]:
    items = json.loads((ROOT / "bench" / "quality_items.json").read_text())
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t} for t in item["turns"][:1]],
                                           tokenize=False, add_generation_prompt=True) for item in items]
    text = (ROOT / "bench" / "agreement.txt").read_text() + "\n".join(chats)
    return tokenizer(text, add_special_tokens=False).input_ids


def top1(model, ids: list[int], chunk: int = 512):
    """Teacher-forced greedy predictions over `ids`, in independent chunks."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            out.append(model(input_ids=torch.tensor([ids[i:i + chunk]])).logits[0].argmax(-1))
    return torch.cat(out)


def top1_steps(fast, ids: list[int], chunk: int = 512):
    """The same predictions from the fast path's own decode steps (one token per forward:
    the C decode step with int8 weights), in the same chunks as `top1`."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            fast.crop(0)
            out.extend(int(fast.forward([t]).argmax(-1)) for t in ids[i:i + chunk])
    return torch.tensor(out)


def ctranslate2_rate(model_dir: Path, out_dir: Path, tokenizer, prompt_ids: list[int], n: int, runs: int):
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return None
    import torch

    if not (out_dir / "model.bin").exists():
        TransformersConverter(str(model_dir)).convert(str(out_dir), quantization="int8", force=True)
    gen = ctranslate2.Generator(str(out_dir), device="cpu", compute_type="int8", intra_threads=torch.get_num_threads())
    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    rates, firsts = [], []
    for _ in range(runs + 1):
        start, first, count = time.perf_counter(), None, 0
        for _step in gen.generate_tokens(tokens, max_length=n, sampling_topk=1):
            first = first or time.perf_counter()
            count += 1
        end = time.perf_counter()
        if count > 1:
            rates.append((count - 1) / (end - first))
            firsts.append((first - start) * 1000)
    return {"decode_tok_s": round(statistics.median(rates[1:] or rates), 2),
            "ttft_ms": round(statistics.median(firsts[1:] or firsts), 1)}


def measure(name: str, data: Path, runs: int, tokens: int) -> dict:
    from engine.config import load_config
    from engine.errors import Unavailable
    from engine.llm import load_backend
    from engine.llm.base import GenParams
    from engine.llm.fastpath import FastLM
    from engine.llm.kernels import q8
    from engine.llm.loading import converted_dir
    from engine.llm.sources import resolve

    cfg = load_config("cpu", overrides={"data_dir": str(data), "llm": name, "llm.decode": "fp32"}, env={})
    try:
        t0 = time.perf_counter()
        backend = load_backend(cfg.llm, cfg.data_path / "models")
    except Unavailable as exc:
        return {"skipped": str(exc)}
    load_s = time.perf_counter() - t0
    fp32 = backend.fast  # (the app's own load: read without transformers when lean.py can, engine/llm/lean.py)
    params = GenParams(max_new_tokens=tokens, temperature=0.0)
    ours(backend, params, tokens)  # warm-up
    n = ours(backend, params, tokens)["n"]
    params = GenParams(max_new_tokens=n, temperature=0.0)
    rows: dict[str, list] = {k: [] for k in (*SETTINGS, "generate", "generate_b")}
    for _ in range(runs):  # interleaved, so drift hits all alike
        for setting, fast in (("transformers", None), ("fp32", fp32)):
            backend.fast = fast
            rows[setting].append(ours(backend, params, n))
        rows["generate"].append(plain(backend, n))
    ids = agreement_ids(backend.tokenizer)
    reference = top1(backend.model, ids)
    del fp32  # (its fused fp32 copies)
    backend.fast = FastLM.attach(backend.model, backend.context_tokens, int8=q8.load(cfg.data_path / "models" / "kernels"))
    if backend.fast.int8 is None:
        return {"skipped": "int8 kernel: " + q8.reason()}
    ours(backend, params, n)  # warm-up
    chats = []
    for _ in range(runs):  # (generate() runs the same fp32 matmuls on the now int8-valued weights)
        rows["int8"].append(ours(backend, params, n))
        rows["generate_b"].append(plain(backend, n))
        chats.append(new_chat(backend))
    agree = float((top1(backend.model, ids) == reference).float().mean())
    steps_agree = float((top1_steps(backend.fast, ids) == reference).float().mean())
    med = lambda key, field: round(statistics.median(r[field] for r in rows[key]), 2)  # noqa: E731
    prompt_ids = backend.encode(PROMPT)
    prompt_text = backend.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    source = resolve(cfg.llm.model, cfg.data_path / "models")
    llama = llamacpp(source.path, prompt_text, n, runs) if source.is_gguf else None
    converted = converted_dir(source, cfg.data_path / "models") if source.is_gguf else None  # (built for .model)
    ct2 = ctranslate2_rate(converted, data / f"ct2-{name}", backend.tokenizer, prompt_ids, n, runs) if converted else None
    result = {
        "model": backend.name, "new_tokens": n, "runs": runs, "load_s": round(load_s, 2),
        "load": "lean (no transformers import)" if backend.lean is not None else "transformers",
        "agreement_tokens": len(ids), "int8_top1_agreement": round(agree, 4),
        "int8_decode_steps_top1_agreement": round(steps_agree, 4),
        "generate_tok_s": med("generate", "e2e_tok_s"), "generate_tok_s_int8_phase": med("generate_b", "e2e_tok_s"),
    }
    for setting in SETTINGS:
        result[setting] = {"ttft_ms": med(setting, "ttft_ms"), "decode_tok_s": med(setting, "decode_tok_s"),
                           "e2e_tok_s": med(setting, "e2e_tok_s")}
    best = result["int8"]["decode_tok_s"]
    result["int8"]["app_prompt_ttft_ms"] = {case: round(statistics.median(c[case] for c in chats), 1)
                                            for case in ("cold", "primed")}
    result["int8_vs_generate"] = round(med("int8", "e2e_tok_s") / result["generate_tok_s_int8_phase"], 2)
    result["int8_vs_transformers_decode"] = round(best / result["transformers"]["decode_tok_s"], 2)
    if llama:
        result["llamacpp"] = {"tok_s": round(llama, 2), "when": "this run"}
    elif name in LLAMACPP_RECORDED:
        result["llamacpp"] = {**LLAMACPP_RECORDED[name], "note": "not installed in this run (make llamacpp)"}
    if "llamacpp" in result:
        result["int8_vs_llamacpp"] = round(best / result["llamacpp"]["tok_s"], 3)
    if ct2:
        result["ctranslate2_int8"] = ct2
        result["int8_vs_ctranslate2"] = round(best / ct2["decode_tok_s"], 2)
    backend.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--data", default=str(Path.home() / ".cache" / "omni-assistant" / "bench"),
                    help="where converted weights are kept between runs")
    ap.add_argument("--skip-start", action="store_true", help="skip the cold/warm app start timing")
    ap.add_argument("--starts", type=int, default=1, help="warm starts to time (the median is reported)")
    ap.add_argument("--start-only", action="store_true",
                    help="only the cold/warm app start, added to the last results file (the models' figures kept)")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / "text.json"
    if args.start_only:
        result = json.loads(out.read_text()) if out.exists() else {"models": {}}
        result["app"] = app_start(args.starts)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["app"]))
        return

    import resource

    import torch

    result = {"machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "load_avg_at_start": os.getloadavg()[0]}, "models": {}}
    for name in args.models.split(","):
        result["models"][name] = measure(name, Path(args.data), args.runs, args.tokens)
        print(json.dumps({name: result["models"][name]}), flush=True)
    result["bench_process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if not args.skip_start:
        result["app"] = app_start(args.starts)
    result["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
