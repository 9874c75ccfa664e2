"""The lean decode path (engine/llm/fastpath.py) against transformers' own forward: the
same logits at every position, whether the prompt runs at once, token by token, or after
a cropped (reused) prefix; the model itself unchanged by the fusing; the backend's answers
identical with the path on and off; and architectures it does not compute left alone."""
from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.llm import load_backend
from engine.llm.base import GenParams
from engine.llm.fastpath import FastLM
from engine.llm.kernels import q8
from engine.llm.tiny import build_tiny_model, build_tiny_moe

IDS = [5, 17, 3, 38, 41, 9, 20, 7, 34, 33, 2, 31, 15, 29, 4, 28]


def tiny_qwen2(seed: int = 0):
    """A 2-layer Qwen2 (q/k/v biases) with seeded random weights and non-zero biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rope_theta=10000.0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return model


def reference(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def computes(fast, want, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """`fast` gives the logits `want` (transformers' at every position of IDS): one token at a
    time on its static cache, the prompt at once (the causal mask), and the prompt's rest
    after a cropped cache."""
    with torch.inference_mode():
        fast.crop(0)
        steps = torch.cat([fast.forward([t]) for t in IDS])
        fast.crop(0)
        whole = fast.forward(IDS)
        fast.crop(3)
        rest = fast.forward(IDS[3:])
    assert torch.allclose(steps, want, rtol=rtol, atol=atol)
    assert torch.allclose(whole[0], want[-1], rtol=rtol, atol=atol)
    assert torch.allclose(rest[0], want[-1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("build", [lambda: build_tiny_model(3)[0], tiny_qwen2], ids=["llama", "qwen2"])
def test_logits_match_transformers_at_every_position(build):
    model = build()
    want = reference(model, IDS)
    fast = FastLM.attach(model, capacity=64)
    assert fast is not None
    with torch.inference_mode():
        got = [fast.forward([t]) for t in IDS]  # one token at a time on the static cache
        assert torch.allclose(torch.cat(got), want, atol=1e-4)
        fast.crop(0)
        whole = fast.forward(IDS)  # the prompt at once: the causal mask
        assert torch.allclose(whole[0], want[-1], atol=1e-4)
        fast.crop(6)  # a reused prefix: the rest runs with the mask offset by 6 positions
        assert fast.length == 6
        rest = fast.forward(IDS[6:])
        assert torch.allclose(rest[0], want[-1], atol=1e-4)
    assert torch.allclose(reference(model, IDS), want, atol=1e-5)  # fusing left the model's forward as it was


def test_fused_weights_are_shared_not_copied():
    model = build_tiny_model(1)[0]
    before = sum(p.numel() for p in model.parameters())
    fast = FastLM.attach(model, capacity=32)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == fast.layers[0].qkv.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before


def test_context_overflow_is_a_clear_error():
    fast = FastLM.attach(build_tiny_model(0)[0], capacity=8)
    with torch.inference_mode(), pytest.raises(ValueError, match="holds 8 tokens"):
        fast.forward(IDS)


def test_architectures_it_does_not_compute_keep_transformers_forward(tmp_path):
    assert FastLM.attach(build_tiny_moe(0)[0], capacity=32) is None
    moe = load_backend(load_config("tiny", overrides={"llm.model": "tiny-moe"}, env={}).llm, tmp_path)
    assert moe.fast is None


def run(backend, messages, n=16):
    gen = backend.generate(messages, (), GenParams(max_new_tokens=n, temperature=0.0))
    parts = []
    while True:
        try:
            parts.append(next(gen).text)
        except StopIteration as stop:
            return "".join(parts), stop.value


def test_backend_answers_the_same_with_the_path_on_and_off(tmp_path):
    on = load_backend(load_config("tiny", overrides={"llm.decode": "fp32"}, env={}).llm, tmp_path)
    off = load_backend(load_config("tiny", overrides={"llm.decode": "transformers"}, env={}).llm, tmp_path)
    assert on.fast is not None and off.fast is None
    assert on.decode_path == "fast path, fp32" and off.decode_path == "transformers forward"
    chat = [{"role": "user", "content": "Tell me about the sea and the boats on it."}]
    first_on, first_off = run(on, chat), run(off, chat)
    assert first_on == first_off
    follow = chat + [{"role": "assistant", "content": first_on[0]}, {"role": "user", "content": "And then?"}]
    (text_on, usage_on), (text_off, usage_off) = run(on, follow), run(off, follow)
    assert text_on == text_off
    assert usage_on["cached_prompt_tokens"] == usage_off["cached_prompt_tokens"] > 0


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    built = q8.load(tmp_path_factory.mktemp("kernels"))
    assert built is not None, q8.reason()  # gcc is installed by `make install` (Makefile: system packages)
    return built


@pytest.mark.parametrize("rows,cols,tokens,bias", [(96, 64, 1, False), (40, 96, 3, True), (24, 50, 2, True)],
                         ids=["groups", "prompt+bias", "odd-columns"])
def test_int8_kernel_equals_its_dequantized_weight(lib, rows, cols, tokens, bias):
    torch.manual_seed(rows)
    w = torch.randn(rows, cols) * torch.rand(rows, 1) * 3  # rows of different scale
    b = torch.randn(rows) if bias else None
    layer = q8.Q8Linear(w, b, lib)
    x = torch.randn(1, tokens, cols)
    want = torch.nn.functional.linear(x, layer.dequantized(), b)
    assert torch.allclose(layer(x), want, rtol=1e-4, atol=1e-4)
    assert (layer.dequantized() - w).abs().max() <= w.abs().max() / 127  # within half a step of its group's scale x2


@pytest.mark.parametrize("rows,cols,bits,bias", [(13, 320, 8, True), (30, 64, 4, False), (7, 50, 8, True),
                                                (11, 288, 5, True)],
                         ids=["8-bit, panels and column blocks with tails", "4-bit", "odd-columns", "5-bit"])
def test_the_prompt_matmul_equals_its_dequantized_weight(lib, rows, cols, bits, bias):
    """A prompt's many tokens go through q8_gemm (panels of 6 rows, 256 columns, 16 tokens at a
    time): any row, column and token count computes the dequantized weight's matmul."""
    torch.manual_seed(cols)
    levels = {4: 16, 5: 32, 8: 256}[bits]
    w = torch.randint(0, levels, (rows, cols)).float() * torch.rand(rows, 1) * 0.1 - 0.3
    b = torch.randn(rows) if bias else None
    layer = q8.Q8Linear(w, b, lib, compact=True)
    assert layer.bits == bits
    assert bits == 8 or torch.allclose(layer.dequantized(), w, atol=1e-5)  # 16 or 32 levels: found exactly
    for tokens in (1, 3, 5, 8, 16, 21, 40):
        x = torch.randn(1, tokens, cols)
        want = torch.nn.functional.linear(x, layer.dequantized(), b)
        assert torch.allclose(layer(x), want, rtol=1e-4, atol=1e-4), tokens  # the matvec (decode) path
        x = torch.randn(1, tokens, cols)
        want = torch.nn.functional.linear(x, layer.dequantized(), b)
        assert torch.allclose(layer.many(x), want, rtol=1e-4, atol=1e-4), tokens


def test_int8_decode_computes_the_quantized_model(lib):
    """The int8 steps, an fp32 prompt and transformers' forward all compute one model: the
    weights rounded to int8 (the fused views and the tied head/embedding set in place)."""
    import copy

    model = build_tiny_model(5)[0]
    original = copy.deepcopy(model)
    fast = FastLM.attach(model, capacity=64, int8=lib)
    layer = model.model.layers[0].self_attn
    q_rows = layer.q_proj.weight.shape[0]
    assert torch.equal(layer.q_proj.weight, fast.layers[0].q8["qkv"].dequantized()[:q_rows])
    want = reference(model, IDS)
    computes(fast, want)
    assert not torch.equal(reference(original, IDS), want)  # (random weights are rounded: the GGUF case is below)


def on_gguf_grids(model):
    """Weights as a GGUF file holds them: each 32-weight block on 16 affine levels (Q4_1), the
    tied embedding/head on a symmetric 8-bit grid (Q8_0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            b = p.view(p.shape[0], -1, 32)
            if "embed" in name:
                d = (b.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
                b.copy_(torch.round(b / d) * d)
            else:
                lo = b.amin(-1, keepdim=True)
                d = ((b.amax(-1, keepdim=True) - lo) / 15).clamp(min=1e-12)
                b.copy_(lo + torch.round((b - lo) / d) * d)
    return model


def test_gguf_weights_decode_exactly_in_8_bits(lib):
    """A model converted from a 4-bit (or Q8_0) GGUF loses nothing on the int8 path: its blocks
    land on the kernel's grids, so the int8 steps compute the fp32 model itself."""
    import copy

    model = on_gguf_grids(build_tiny_model(6)[0])
    fp32 = reference(copy.deepcopy(model), IDS)
    fast = FastLM.attach(model, capacity=64, int8=lib)
    assert {layer.bits for fl in fast.layers for layer in fl.q8.values()} == {4}  # 4-bit blocks: 4-bit codes
    assert fast.q8_head.bits == 8  # the Q8_0 embedding/head: 8-bit codes
    with torch.inference_mode():
        got = torch.cat([fast.forward([t]) for t in IDS])
    assert torch.allclose(got, fp32, rtol=1e-3, atol=1e-4)
    assert torch.equal(got.argmax(-1), fp32.argmax(-1))


def test_the_default_backend_decodes_int8(tmp_path):
    backend = load_backend(load_config("tiny", env={}).llm, tmp_path)
    assert backend.decode_path == "fast path, int8 weights (C kernel)"
    text, usage = run(backend, [{"role": "user", "content": "Hello there."}], n=12)
    assert usage["completion_tokens"] > 0 and text



def test_the_kernel_is_built_once_per_data_dir(tmp_path):
    first = q8.build(tmp_path)
    assert first is not None and first.parent == tmp_path, q8.reason()
    made = first.stat().st_mtime_ns
    assert q8.build(tmp_path) == first and first.stat().st_mtime_ns == made  # a warm start does not recompile


def test_constrained_decoding_runs_on_the_fast_path_and_agrees(tmp_path):
    """structured.json_call steps through backend.steps(): the same object on the fast path
    and on transformers' forward, and valid under the schema on the int8 path."""
    from engine.llm import structured

    schema = {"type": "object", "properties": {"prompt": {"type": "string", "maxLength": 40},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["prompt", "count"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "draw three boats"}]
    results = {}
    for mode in ("fp32", "transformers", "int8"):
        backend = load_backend(load_config("tiny", overrides={"llm.decode": mode}, env={}).llm, tmp_path)
        results[mode] = structured.json_call(backend, msgs, schema, max_new_tokens=96)
    assert results["fp32"] == results["transformers"]
    obj, n = results["int8"]
    assert set(obj) == {"prompt", "count"} and 1 <= obj["count"] <= 9 and n > 0


def test_status_says_how_the_model_decodes(engine):
    from engine.status import status, status_markdown

    assert "decode" not in status(engine)["model"]  # not loaded yet: nothing claimed
    engine.roles["llm"].get()
    report = status(engine)
    assert report["model"]["decode"] == "fast path, int8 weights (C kernel)"
    assert "**Decode:** fast path, int8 weights (C kernel)" in status_markdown(report)



@pytest.mark.parametrize("build", [lambda: on_gguf_grids(build_tiny_model(7)[0]), tiny_qwen2], ids=["llama", "qwen2"])
def test_the_c_decode_step_equals_the_torch_ops(build, lib):
    """q8_decode (every layer of a decode step in one C call) computes what the torch ops
    compute with the same int8 layers: the logits at every position, grouped-query heads,
    q/k/v biases, a cropped cache."""
    fast = FastLM.attach(build(), capacity=64, int8=lib)
    assert fast.decoder is not None
    with torch.inference_mode():
        c_steps = [fast.forward([t]) for t in IDS]
        decoder, fast.decoder = fast.decoder, None
        fast.crop(0)
        torch_steps = [fast.forward([t]) for t in IDS]
        fast.decoder = decoder
        fast.crop(5)
        again = [fast.forward([t]) for t in IDS[5:]]
    assert torch.allclose(torch.cat(c_steps), torch.cat(torch_steps), atol=1e-4)
    assert torch.allclose(torch.cat(again), torch.cat(torch_steps[5:]), atol=1e-4)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_code_layouts_round_trip(bits):
    """pack/unpack: each layout gives back its codes (5 bits: 16 nibble bytes + 4 bytes of fifth bits)."""
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (6, 96), dtype=torch.uint8)
    packed = q8.pack(codes, bits)
    assert packed.shape == (6, 96 // 32 * q8.group_bytes(bits))
    assert torch.equal(q8.unpack(packed, bits), codes)
    assert q8.width(codes) == bits or bits == 8


@pytest.mark.parametrize("bits", [5, 8])
def test_fp16_scales_where_exact(lib, bits):
    """Blocks as Q5_0 / Q8_0 hold them (an fp16 scale d, values d * (q - 16) or d * (q - 128)):
    scales and low values are kept in fp16 (4 bytes a group, not 8) and every kernel path
    computes the same weight: matvec, a batch, int8 activations, the prompt matmul."""
    torch.manual_seed(bits)
    rows, cols, top = 24, 256, 2 ** bits
    d = (torch.rand(rows, cols // 32) * 0.02 + 0.001).half().float()
    q = torch.randint(0, top, (rows, cols // 32, 32)).float()
    q[..., 0], q[..., 1] = 0, top - 1  # every block spans its levels
    w = (d[..., None] * (q - top // 2)).reshape(rows, cols)
    layer = q8.Q8Linear(w, None, lib, compact=True)
    assert layer.bits == bits and layer.scale.dtype == torch.float16 and layer.fmt & q8.HALF
    assert torch.equal(layer.dequantized(), w)
    for tokens in (1, 3, 9):
        x = torch.randn(tokens, cols)
        want = x @ w.T
        assert torch.allclose(layer(x), want, rtol=1e-4, atol=1e-4)
        assert torch.allclose(layer.many(x), want, rtol=1e-4, atol=1e-4)
        assert ((layer.x8(x) - want).abs() <= 0.02 * want.abs().amax()).all()
    assert torch.equal(layer.lookup(torch.tensor([3, 0])), w[[3, 0]])
