#!/usr/bin/env python3
"""MoE expert offload: our ExpertCache vs accelerate's device_map offload vs no offload.

A Qwen3-30B-A3B-shaped MoE (Qwen3MoeConfig: hidden 2048, 48 layers, 128
experts, top-8, moe_intermediate 768, 32 heads / 4 KV heads, head_dim 128,
vocab 151936) with RANDOM weights (speed and memory are honest, answers are
not), built in code. Every configuration runs the same loop: prefill of a
128-token prompt (time to first token = prefill + argmax read back), then 32
decode steps through the KV cache, each computing and reading back the argmax.
One warm-up turn with another prompt comes first (kernels, and for our cache
the experts a previous turn left behind); then --runs measured turns, each
with a fresh prompt, medians reported. Side by side, same weights:
 (a) ours_budget_{a,b}: non-expert weights on the fast device, every expert in
     (pinned) CPU memory, engine.moe.offload's LRU ExpertCache with prefetch;
 (b) accelerate_budget_{a,b}: infer_auto_device_map (no-split unit: the decoder
     layer, as device_map="auto" does) + dispatch_model on the same model;
 (c) no_offload: everything on the fast device, when it fits.
On CUDA: the full shape; total VRAM budgets of 8 and 16 GiB (our expert budget
= total - non-expert weights - KV cache - a workspace allowance; accelerate gets
max_memory={0: total, "cpu": host}); experts in NF4 (4-bit, blocks of 64, the
bitsandbytes format, quantized per expert into plain tensors because our
offload moves plain tensors; dequantized with bitsandbytes' kernel when it is
installed and agrees with the reference, else in plain torch), bf16 elsewhere.
On CPU: the same code on a scaled-down shape in float32, budgets of 25% and
50% of the expert bytes, and the "fast tier" is the same RAM, so our figures
show the cache machinery's overhead and hit rates, not PCIe; accelerate, which
cannot offload to "cpu" when it already executes on the CPU, offloads the
layers that do not fit to "disk" (numpy memmaps in a temp folder, page-cached).
Decode inputs: random token ids by default (the argmax is still computed and
read back every step); a random-weight model's greedy output falls into a
short loop whose repeated routing would inflate the cache hit rate.
Prints one JSON object as its last line and writes bench/results/moe.json.

    python bench/moe.py [--runs N] [--shape auto|full|scaled] [--expert-dtype auto|nf4|bf16|fp16|fp32]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
PROMPT_TOKENS, DECODE_STEPS = 128, 32
FULL = dict(hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
            moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            vocab_size=151936, intermediate_size=6144)
SCALED = dict(hidden_size=256, num_hidden_layers=8, num_experts=64, num_experts_per_tok=8,
              moe_intermediate_size=128, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
              vocab_size=4096, intermediate_size=768)
CUDA_TOTALS_GIB = (8, 16)  # budget a, budget b: total VRAM
CPU_FRACTIONS = (0.25, 0.50)  # budget a, budget b: share of the expert bytes
WORKSPACE = 512 * MiB  # CUDA: kept free for activations, logits and dequant temporaries
from moe_model import EMBED_STD, WEIGHT_SCALE, build_model, configure_nf4, expert_bytes, module_bytes, nbytes  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_reset():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_mb() -> float:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
    except (OSError, AttributeError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def turn(model, device, prompt, feed, mark=lambda phase: None):
    """Prefill `prompt`, then DECODE_STEPS steps through the KV cache; each step takes the argmax
    and reads it back. The next input is `feed[i]` (random ids) or, when feed is None, the argmax."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = prompt.to(device)
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)
    token.item()
    t1 = time.perf_counter()
    finite = bool(torch.isfinite(out.logits).all())
    mark("prefill")
    for i in range(DECODE_STEPS):
        nxt = token if feed is None else feed[i].view(1).to(device)
        out = model(input_ids=nxt.view(1, 1), cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        token.item()
    t2 = time.perf_counter()
    mark("decode")
    return {"ttft_ms": (t1 - t0) * 1000, "decode_tok_s": DECODE_STEPS / (t2 - t1), "finite": finite}


def measure(model, device, inputs, runs: int, cache=None) -> dict:
    """One warm-up turn, then `runs` measured turns (medians); peak memory over the measured turns;
    for our cache, hit rate and prefetch accuracy split into prefill and decode."""
    feed = inputs["feed"]
    turn(model, device, inputs["warm"], None if feed is None else feed[-1])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        steady = torch.cuda.memory_allocated(device)
    else:
        rss_reset()
    phases = {"prefill": [], "decode": []}
    snap = {}

    def mark(phase):
        s = cache.stats()
        phases[phase].append({k: s[k] - snap[k] for k in ("hits", "misses", "bytes_moved", "prefetch_guessed",
                                                          "prefetch_correct", "prefetch_loads", "prefetch_useful")})
        snap.update(s)

    rows = []
    for r in range(runs):
        if cache is not None:
            snap.update(cache.stats())
        rows.append(turn(model, device, inputs["prompts"][r], None if feed is None else feed[r],
                         mark if cache is not None else (lambda phase: None)))
    out = {"decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rows), 3),
           "ttft_ms": round(statistics.median(r["ttft_ms"] for r in rows), 1),
           "decode_tok_s_runs": [round(r["decode_tok_s"], 3) for r in rows],
           "ttft_ms_runs": [round(r["ttft_ms"], 1) for r in rows],
           "logits_finite": all(r["finite"] for r in rows)}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MiB, 1)
        out["steady_mem_mb"] = round(steady / MiB, 1)
    else:
        out["peak_mem_mb"] = round(rss_peak_mb(), 1)
    if cache is not None:
        total = {}
        for phase, lst in phases.items():
            agg = {k: sum(d[k] for d in lst) for k in lst[0]}
            look = agg["hits"] + agg["misses"]
            out[f"{phase}_hit_rate"] = round(agg["hits"] / look, 4) if look else None
            out[f"{phase}_prefetch_accuracy"] = (round(agg["prefetch_correct"] / agg["prefetch_guessed"], 4)
                                                 if agg["prefetch_guessed"] else None)
            for k, v in agg.items():
                total[k] = total.get(k, 0) + v
        look = total["hits"] + total["misses"]
        out["hit_rate"] = round(total["hits"] / look, 4) if look else None
        out["hit_rate_resident_only"] = (round((total["hits"] - total["prefetch_useful"]) / look, 4)
                                         if look else None)
        out["prefetch_accuracy"] = (round(total["prefetch_correct"] / total["prefetch_guessed"], 4)
                                    if total["prefetch_guessed"] else None)
        out["prefetch_useful_rate"] = (round(total["prefetch_useful"] / total["prefetch_loads"], 4)
                                       if total["prefetch_loads"] else None)
        dec = {k: sum(d[k] for d in phases["decode"]) for k in phases["decode"][0]}
        out["decode_mb_moved_per_token"] = round(dec["bytes_moved"] / (runs * DECODE_STEPS) / MiB, 2)
        out["prefill_mb_moved"] = round(sum(d["bytes_moved"] for d in phases["prefill"]) / runs / MiB, 1)
    return out


@torch.no_grad()
def routing_overlap(model, device, inputs) -> dict:
    """One untimed extra turn with router hooks: the share of a decode token's experts that the
    previous token also used, per MoE layer, against chance (top_k / num_experts)."""
    from engine.moe.families import find_moe_layers

    layers = find_moe_layers(model)
    seen: dict[int, list[set]] = {la.index: [] for la in layers}

    def hook(la):
        def record(module, args, out):
            idx = out[2] if isinstance(out, tuple) else torch.topk(out, la.top_k, dim=-1).indices
            seen[la.index].append(set(idx.reshape(-1).tolist()))
        return record

    handles = [la.router.register_forward_hook(hook(la)) for la in layers]
    try:
        feed = inputs["feed"]
        turn(model, device, inputs["warm"], None if feed is None else feed[-1])
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    for la in layers:
        dec = seen[la.index][1:]  # [0] is the prefill
        per_layer.append(statistics.mean(len(a & b) / len(b) for a, b in zip(dec, dec[1:])))
    return {"decode_consecutive_expert_overlap": round(statistics.mean(per_layer), 4),
            "chance": round(layers[0].top_k / layers[0].num_experts, 4),
            "first_layer": round(per_layer[0], 4), "last_layer": round(per_layer[-1], 4),
            "max_layer": round(max(per_layer), 4)}


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks cached by torch
        if host_empty is not None:
            host_empty()


def summarize_map(device_map: dict) -> dict:
    """{device: "embed_tokens, layers 0-11, norm, lm_head"} from an accelerate device map."""
    per: dict[str, list[str]] = {}
    for name, dev in device_map.items():
        per.setdefault(str(dev), []).append(name)
    out = {}
    for dev, names in per.items():
        nums = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"model\.layers\.(\d+)", n)))
        parts = [n.replace("model.", "") for n in names if not re.fullmatch(r"model\.layers\.\d+", n)]
        ranges, start = [], None
        for i, n in enumerate(nums):
            start = n if start is None else start
            if i + 1 == len(nums) or nums[i + 1] != n + 1:
                ranges.append(f"{start}-{n}" if n != start else f"{n}")
                start = None
        if ranges:
            parts.insert(1 if parts and parts[0] == "embed_tokens" else 0, "layers " + ",".join(ranges))
        out[dev] = ", ".join(parts)
    return out


# -- the configurations ----------------------------------------------------------------------
def run_ours(model, device, budgets, inputs, runs, info) -> dict:
    from engine.moe.offload import min_budget_bytes, offload_experts, restore_forwards
    from engine.moe.families import find_moe_layers

    results = {}
    one = min_budget_bytes(find_moe_layers(model))
    for key, budget in budgets.items():
        if budget < one:
            results[key] = {"skipped": f"expert budget {budget} B is below one expert ({one} B)"}
            continue
        release(device)
        cache = offload_experts(model, device, budget, prefetch=True)
        res = measure(model, device, inputs, runs, cache)
        s = cache.stats()
        if key == "budget_a":  # after the stats above: this extra turn is not counted
            info["routing"] = routing_overlap(model, device, inputs)
        res.update({"expert_budget_mb": round(budget / MiB, 1),
                    "expert_budget_experts": budget // one,
                    "expert_budget_share": round(budget / info["expert_bytes"], 4),
                    "cache_peak_mb": round(s["peak_bytes"] / MiB, 1),
                    "fast_tier_weights_mb": round((info["non_expert_bytes"] + s["peak_bytes"]) / MiB, 1)})
        results[key] = res
        restore_forwards(cache)
        del cache
    return results


def run_accelerate(shape, dtype, experts, device, total, inputs, runs, build_device, host_bytes) -> dict:
    from accelerate import dispatch_model, infer_auto_device_map

    model = build_model(shape, dtype, experts, build_device)
    offload_dir = None
    if device.type == "cuda":
        max_memory = {device.index or 0: total, "cpu": host_bytes}
        method = "infer_auto_device_map(max_memory={0: total, 'cpu': host}) + dispatch_model: CPU layers copied in per forward"
    else:
        offload_dir = tempfile.mkdtemp(prefix="moe-bench-offload-")
        max_memory = {"cpu": total, "disk": 1 << 50}
        method = ("infer_auto_device_map(max_memory={'cpu': total, 'disk': rest}) + dispatch_model(offload_dir=tmp): "
                  "'disk' layers are numpy memmaps read (copied) in per forward")
    try:
        dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
        fast = {device.index or 0, "cuda", f"cuda:{device.index or 0}"} if device.type == "cuda" else {"cpu"}
        resident = sum(module_bytes(model, n) for n, d in dmap.items() if d in fast)
        offloaded = [module_bytes(model, n) for n, d in dmap.items() if d not in fast]
        dispatch_model(model, device_map=dmap, main_device=(device.index or 0) if device.type == "cuda" else "cpu",
                       offload_dir=offload_dir)
        if offload_dir:
            os.sync()  # let the offload files' writeback finish before timing reads of them
        release(device)
        res = measure(model, device, inputs, runs)
        res.update({"method": method, "max_memory_mb": round(total / MiB, 1), "device_map": summarize_map(dmap),
                    "offloaded_mb_copied_per_forward": round(sum(offloaded) / MiB, 1),
                    "fast_tier_weights_mb": round((resident + max(offloaded, default=0)) / MiB, 1)})
        return res
    finally:
        del model
        release(device)
        if offload_dir:
            shutil.rmtree(offload_dir, ignore_errors=True)


def main() -> None:
    global DECODE_STEPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    ap.add_argument("--shape", default="auto", choices=["auto", "full", "scaled"])
    ap.add_argument("--expert-dtype", default="auto", choices=["auto", "nf4", "bf16", "fp16", "fp32"])
    ap.add_argument("--runs", type=int, default=None, help="measured turns per configuration (default 5 CPU, 2 CUDA)")
    ap.add_argument("--decode-inputs", default="random", choices=["random", "greedy"])
    ap.add_argument("--decode-steps", type=int, default=DECODE_STEPS, help="decode steps per turn (bench/gpu_check.py: 16)")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    DECODE_STEPS = args.decode_steps
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial: dict = {"bench": "moe", "partial": True, "decode_steps": DECODE_STEPS}

    def progress(name: str, res: dict) -> None:
        """One JSON line per configuration, and the JSON so far: a run stopped at a time limit keeps it."""
        print(f"{name}: {json.dumps(res)}", file=sys.stderr, flush=True)
        partial[name] = res
        partial["wall_s"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(partial, indent=2) + "\n")

    import accelerate
    import transformers

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    shape_name = args.shape if args.shape != "auto" else ("full" if cuda else "scaled")
    shape = FULL if shape_name == "full" else SCALED
    edt = args.expert_dtype if args.expert_dtype != "auto" else ("nf4" if cuda else "fp32")
    dense_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        edt, torch.bfloat16 if cuda else torch.float32)
    experts = "nf4" if edt == "nf4" else "fused"
    nf4_kernel = configure_nf4(device, dense_dtype) if experts == "nf4" else None
    runs = args.runs or (2 if cuda else 5)

    gen = torch.Generator().manual_seed(1234)
    V = shape["vocab_size"]
    inputs = {"warm": torch.randint(0, V, (1, PROMPT_TOKENS), generator=gen),
              "prompts": [torch.randint(0, V, (1, PROMPT_TOKENS), generator=gen) for _ in range(runs)],
              "feed": (None if args.decode_inputs == "greedy" else
                       torch.randint(0, V, (runs + 1, DECODE_STEPS), generator=gen))}

    t0 = time.perf_counter()
    model = build_model(shape, dense_dtype, experts, device)
    build_s = time.perf_counter() - t0
    total_bytes = nbytes(model.parameters())
    model_params = [p.numel() for p in model.parameters()]
    exp_bytes = expert_bytes(model)
    non_expert = total_bytes - exp_bytes
    cfg = model.config
    kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                * (PROMPT_TOKENS + DECODE_STEPS + 1) * torch.finfo(dense_dtype).bits // 8)
    info = {"expert_bytes": exp_bytes, "non_expert_bytes": non_expert}

    if cuda:
        totals = {k: g * GiB for k, g in zip(("budget_a", "budget_b"), CUDA_TOTALS_GIB)}
        budgets = {k: min(t - non_expert - kv_bytes - WORKSPACE, exp_bytes) for k, t in totals.items()}
        budget_desc = {k: {"total_vram_gib": g, "expert_budget_mb": round(budgets[k] / MiB, 1),
                           "rule": "expert budget = total - non-expert weights - KV cache - 512 MiB workspace"}
                       for k, g in zip(totals, CUDA_TOTALS_GIB)}
    else:
        budgets = {k: int(f * exp_bytes) for k, f in zip(("budget_a", "budget_b"), CPU_FRACTIONS)}
        totals = {k: non_expert + kv_bytes + b for k, b in budgets.items()}
        budget_desc = {k: {"expert_share": f, "expert_budget_mb": round(budgets[k] / MiB, 1),
                           "total_fast_tier_mb": round(totals[k] / MiB, 1),
                           "rule": "expert budget = share of the expert bytes; accelerate's max_memory['cpu'] = "
                                   "non-expert + KV + that budget (the same total)"}
                       for k, f in zip(totals, CPU_FRACTIONS)}
    try:
        import psutil
        host_bytes = int(psutil.virtual_memory().available * 0.9)
    except ImportError:
        host_bytes = 64 * GiB

    result: dict = {}
    # accelerate first: our offload pins host memory, which torch's host allocator keeps cached
    acc = {}
    for key in ("budget_a", "budget_b"):
        name = f"accelerate_{key}"
        if args.skip_accelerate:
            acc[key] = {"skipped": "--skip-accelerate"}
            continue
        try:
            acc[key] = run_accelerate(shape, dense_dtype, experts, device, totals[key], inputs, runs, device, host_bytes)
        except Exception as exc:  # noqa: BLE001 - report, don't lose the other columns
            acc[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        progress(name, acc[key])

    ours = run_ours(model, device, budgets, inputs, runs, info)
    for key, res in ours.items():
        progress(f"ours_{key}", res)

    release(device)
    need = exp_bytes + kv_bytes + WORKSPACE  # the non-expert weights are already there
    free = torch.cuda.mem_get_info(device)[0] if cuda else None
    if cuda and need > free:
        no_off = {"skipped": f"needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"}
    else:
        model.to(device)
        no_off = measure(model, device, inputs, runs)
        no_off["fast_tier_weights_mb"] = round(total_bytes / MiB, 1)
    progress("no_offload", no_off)
    del model
    release(device)

    def ratio(a, b, key, invert=False):
        if not (isinstance(a, dict) and isinstance(b, dict)) or key not in a or key not in b:
            return None
        return round((b[key] / a[key]) if invert else (a[key] / b[key]), 3)

    result = {
        "bench": "moe",
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "shape": shape_name,
        "model_config": {**shape, "architecture": "Qwen3MoeForCausalLM", "weights": "random",
                         "embed_std": EMBED_STD, "weight_std": round(WEIGHT_SCALE / shape["hidden_size"] ** 0.5, 5)},
        "params_b": round(sum(model_params) / 1e9, 3),
        "weights_mb": {"total": round(total_bytes / MiB, 1), "experts": round(exp_bytes / MiB, 1),
                       "non_expert": round(non_expert / MiB, 1), "kv_cache": round(kv_bytes / MiB, 2),
                       "one_expert": round(exp_bytes / (cfg.num_hidden_layers * cfg.num_experts) / MiB, 3)},
        "expert_dtype": ("nf4 (bitsandbytes NF4 layout, blocks of 64, float32 absmax; quantized per expert into "
                         f"plain tensors because our offload moves plain tensors; dequant: {nf4_kernel})"
                         if experts == "nf4" else f"{str(dense_dtype).replace('torch.', '')} (transformers' fused 3D layout)"),
        "non_expert_dtype": str(dense_dtype).replace("torch.", ""),
        "experts_forward": ("ExpertList of NF4Expert modules (engine.moe.families) in every column" if experts == "nf4"
                            else f"accelerate / no_offload: transformers '{cfg._experts_implementation}' experts; "
                                 "ours: engine.moe per-expert loop"),
        "prompt_tokens": PROMPT_TOKENS, "decode_steps": DECODE_STEPS, "runs": runs,
        "decode_inputs": ("random token ids (argmax still computed and read back each step); a random-weight model's "
                          "greedy output loops over a few tokens and would inflate hit rates" if args.decode_inputs == "random"
                          else "greedy: the argmax is fed back"),
        "budgets": budget_desc,
        "routing": info.get("routing"),
        "peak_mem_kind": ("VRAM: torch.cuda.max_memory_allocated over the measured turns (no CUDA context)" if cuda else
                          "process RSS peak (VmHWM, reset after the warm-up turn) over the measured turns: on CPU "
                          "every tier is this RAM, so ours holds all experts plus the cache copies"),
        "ours_budget_a": ours["budget_a"], "ours_budget_b": ours["budget_b"],
        "accelerate_budget_a": acc["budget_a"], "accelerate_budget_b": acc["budget_b"],
        "no_offload": no_off,
        "ratio_ours_vs_accelerate": {
            key: {"decode_tok_s": ratio(ours[key], acc[key], "decode_tok_s"),
                  "ttft_speedup": ratio(ours[key], acc[key], "ttft_ms", invert=True),
                  "peak_mem": ratio(ours[key], acc[key], "peak_mem_mb")} for key in ("budget_a", "budget_b")},
        "ratio_ours_vs_no_offload": {
            key: {"decode_tok_s": ratio(ours[key], no_off, "decode_tok_s"),
                  "ttft_slowdown": ratio(ours[key], no_off, "ttft_ms")} for key in ("budget_a", "budget_b")},
        "notes": [
            "ours: hit_rate counts lookups served from the fast tier, including experts the lookahead prefetch "
            "loaded (on CUDA on a side stream, overlapping compute; on CPU synchronously); hit_rate_resident_only "
            "leaves those out; decode_mb_moved_per_token is the traffic that remains.",
            "Random weights: routing is about as uncorrelated between consecutive tokens as chance (see routing), "
            "a pessimistic floor for the cache next to a trained model's skewed, partly repetitive routing; but "
            "adjacent layers route alike (the token dominates the residual), so prefetch_accuracy is optimistic.",
        ],
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "threads": torch.get_num_threads(), "build_s": round(build_s, 1),
    }
    if not cuda:
        result["gpu_figures"] = "pending: no GPU lent"
        result["notes"] += [
            "CPU: the fast tier is the same RAM as the slow one, so ours measures the cache machinery's overhead "
            "(routing, LRU, copies of missed experts, prefetch lookahead) and its hit rates, not PCIe.",
            "CPU accelerate: with execution on the CPU, accelerate treats only 'disk' as offloaded ('cpu' layers would "
            "run in place, copying nothing), so the layers beyond max_memory['cpu'] go to disk memmaps (page-cached "
            "after the warm-up): a whole decoder layer, all its experts, is copied in for every forward.",
        ]
    else:
        result["notes"] += [
            "accelerate's unit is the decoder layer (attention + all experts), copied from pageable CPU memory on "
            "every forward; ours copies only routed experts that miss the cache, from pinned memory.",
        ]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
