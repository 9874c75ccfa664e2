"""What the gpu profile claims, checked on CUDA (all gpu-marked: skipped without a GPU;
bench/gpu_check.py runs them first on a lent one).

- bitsandbytes 4-bit layers compute what fp16 computes, within NF4's error;
- NF4 experts offloaded behind the expert cache give the tokens they give on the device,
  dequantized by bitsandbytes' kernel;
- the cache's VRAM stays within its budget (what torch allocates, not only its own count);
- prefetch copies run on a side stream, overlapping the compute stream's kernels;
- a 4-bit LLM parks in CPU memory for a diffusion pipeline and answers the same after.
The models are small seeded random ones, a few MB, so each test takes seconds.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MiB = 1 << 20


def moe_model(seed: int = 0):
    """A Qwen3-MoE with experts big enough (1024 x 512, NF4: 0.9 MB each) that allocator rounding and
    activations are small next to the cache; its experts quantized to NF4, everything in fp16."""
    from engine.moe.nf4 import quantize_experts

    config = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048,
                                         moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                         num_key_value_heads=2, head_dim=128, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval().half()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    quantize_experts(model)  # after .half(): the NF4 blocks' absmax stays float32, as bitsandbytes wants it
    return model


def ids(n: int, batch: int = 1):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(1)).cuda()


@torch.no_grad()
def greedy(model, prompt, new: int = 8):
    logits = model(prompt).logits
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
    return logits, tokens


def test_bitsandbytes_4bit_forward_equals_fp16_within_nf4_error():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    dense = torch.nn.Linear(1024, 1024, bias=True).half()
    q = bnb.nn.Linear4bit(1024, 1024, bias=True, compute_dtype=torch.float16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    dense, q = dense.cuda(), q.cuda()  # moving the Params4bit to CUDA quantizes it
    x = torch.randn(16, 1024, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        got, want = q(x), dense(x)
        exact = torch.nn.functional.linear(x, dequantize_4bit(q.weight.data, q.weight.quant_state), dense.bias)
    assert torch.allclose(got, exact, atol=2e-2, rtol=1e-2)  # the kernel computes with the NF4 weights
    rel = ((got - want).float().norm() / want.float().norm()).item()
    assert rel < 0.15, f"NF4 layer is {rel:.3f} away from fp16 (relative)"  # NF4 rounding: 0.09 on these weights


def test_4bit_llm_logits_stay_close_to_fp16_on_cuda(tmp_path):
    """The gpu profile's load path for a local model directory: fp16 on the GPU against 4-bit
    bitsandbytes layers (fp16 compute) of the same checkpoint. A 4-layer Llama 1024 wide with
    transformers' own init: NF4 keeps every position's logits within cosine 0.85 (0.91-0.93 in
    float32 on a CPU) at an eighth of the linear layers' memory."""
    pytest.importorskip("bitsandbytes")
    from engine.config import LLMConfig
    from engine.llm import load_backend
    from engine.llm.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=False,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    full = load_backend(LLMConfig(model=str(tmp_path / "llama"), temperature=0.0, device="cuda"), tmp_path)
    quant = load_backend(LLMConfig(model=str(tmp_path / "llama"), temperature=0.0, device="cuda",
                                   quantization="4bit"), tmp_path)
    assert next(full.model.parameters()).dtype == torch.float16
    assert sum(type(m).__name__ == "Linear4bit" for m in quant.model.modules()) == 4 * 7
    prompt = torch.tensor([full.encode([{"role": "user", "content": "Tell me about a lighthouse at dusk."}])],
                          device="cuda")
    with torch.inference_mode():
        a, b = full.model(input_ids=prompt).logits[0].float(), quant.model(input_ids=prompt).logits[0].float()
    assert torch.isfinite(b).all()
    rows = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert rows.min() > 0.85 and rows.mean() > 0.9, f"cosine per position: min {rows.min():.3f}, mean {rows.mean():.3f}"
    assert quant.model.get_memory_footprint() < full.model.get_memory_footprint() / 3


def test_nf4_experts_offloaded_give_the_on_device_tokens():
    pytest.importorskip("bitsandbytes")
    from engine.moe.families import find_moe_layers
    from engine.moe.nf4 import configure_nf4
    from engine.moe.offload import min_budget_bytes, offload_experts

    assert configure_nf4(torch.device("cuda"), torch.float16).startswith("bitsandbytes")  # its kernel, checked
    prompt = ids(12, batch=2)
    on_device = moe_model().cuda()
    ref_logits, ref_tokens = greedy(on_device, prompt)
    del on_device
    model = moe_model()
    one = min_budget_bytes(find_moe_layers(model))
    cache = offload_experts(model, "cuda", 5 * one, prefetch=True)  # 5 of the 32 experts fit
    logits, tokens = greedy(model, prompt)
    assert torch.equal(tokens, ref_tokens), "offloaded NF4 experts changed the greedy tokens"
    assert torch.allclose(logits, ref_logits, atol=1e-2, rtol=0)
    stats = cache.stats()
    assert stats["evictions"] > 0 and stats["peak_bytes"] <= stats["budget_bytes"]


def test_the_expert_cache_stays_within_its_budget_in_vram():
    """Every load: the cache's count within the budget, and what torch has allocated beyond the
    model's resident weights no more than that count plus activations (evicted copies are
    really released, side-stream copies included)."""
    from engine.moe.families import find_moe_layers
    from engine.moe.offload import min_budget_bytes, offload_experts

    model = moe_model()
    one = min_budget_bytes(find_moe_layers(model))
    budget = 12 * one
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = offload_experts(model, "cuda", budget, prefetch=True)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - before  # the non-expert weights, now on the GPU
    over: list[int] = []

    def check(c):
        assert c.used <= c.budget
        over.append(torch.cuda.memory_allocated() - before - resident - c.used)

    cache.on_load.append(check)
    torch.cuda.reset_peak_memory_stats()
    greedy(model, ids(64, batch=2), new=16)
    peak = torch.cuda.max_memory_allocated() - before - resident
    assert cache.stats()["evictions"] > 0 and over
    slack = 8 * MiB  # activations, logits, one expert's dequantized fp16 weights (3 MB)
    assert max(over) <= slack, f"{max(over) / MiB:.1f} MiB allocated beyond the cache's count at a load"
    assert peak <= budget + slack, f"peak {peak / MiB:.1f} MiB above the weights, budget {budget / MiB:.1f} MiB"


def test_prefetch_copies_overlap_compute_on_a_side_stream(tmp_path):
    """A prefill under the profiler: the expert copies the lookahead starts run on another stream
    than the model's kernels, and some of that copy time overlaps kernels running."""
    from torch.profiler import ProfilerActivity, profile

    from engine.moe.families import find_moe_layers
    from engine.moe.offload import min_budget_bytes, offload_experts

    model = moe_model()
    one = min_budget_bytes(find_moe_layers(model))
    cache = offload_experts(model, "cuda", 12 * one, prefetch=True)
    prompt = ids(256)
    with torch.no_grad():
        model(prompt)  # warm-up: kernels loaded, cache filled once
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                model(ids(256))
            torch.cuda.synchronize()
    assert cache.stats()["prefetch_loads"] > 0
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    assert copies and kernels, f"the trace has {len(copies)} host-to-device copies and {len(kernels)} kernels"
    streams = {}
    for k in kernels:
        streams[k["args"].get("stream")] = streams.get(k["args"].get("stream"), 0) + 1
    compute = max(streams, key=streams.get)
    side = [c for c in copies if c["args"].get("stream") != compute]
    assert side, f"every host-to-device copy ran on the compute stream {compute}"
    busy = sorted((k["ts"], k["ts"] + k["dur"]) for k in kernels if k["args"].get("stream") == compute)
    overlap = sum(_overlap(c["ts"], c["ts"] + c["dur"], busy) for c in side)
    copy_time = sum(c["dur"] for c in side)
    assert overlap > 0, f"none of {copy_time:.0f} us of side-stream copies overlapped a kernel"


def _overlap(start: float, end: float, busy: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy if a < end and b > start)


def test_a_4bit_llm_parks_for_diffusion_and_answers_the_same(tmp_path):
    """The hand-off on the gpu profile's own setting: 4-bit layers move to CPU memory (park) and
    back (ready), VRAM goes down and comes back, the greedy answer is unchanged."""
    pytest.importorskip("bitsandbytes")
    from engine.config import LLMConfig
    from engine.events import TextDelta
    from engine.llm import load_backend
    from engine.llm.base import GenParams

    def answer(backend):
        return "".join(e.text for e in backend.generate([{"role": "user", "content": "Say something."}], (),
                                                        GenParams(max_new_tokens=12, temperature=0.0))
                       if isinstance(e, TextDelta))

    backend = load_backend(LLMConfig(model="tiny-omni", temperature=0.0, device="cuda", quantization="4bit"), tmp_path)
    before = answer(backend)
    used = torch.cuda.memory_allocated()
    freed = backend.park()
    assert freed > 0 and backend.parked and torch.cuda.memory_allocated() < used
    assert answer(backend) == before and not backend.parked
    assert all(p.is_cuda for p in backend.model.parameters())
