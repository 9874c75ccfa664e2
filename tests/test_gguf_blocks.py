"""A GGUF read from its blocks (engine/llm/gguf_blocks.py): every block type decodes to the
values the `gguf` package dequantizes, the header gives the model's config, and a whole
Llama (q/k rows interleaved by llama.cpp's converter) or Qwen2 model computes the logits
of its dequantized weights at every position, with no fp32 copy and no transformers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from engine.llm.fastpath import FastLM
from engine.llm.gguf_blocks import GgufFile, weights
from engine.llm.tiny import build_tiny_model
from tests.test_fastpath import IDS, computes, lib, reference, tiny_qwen2  # noqa: F401 (lib: a fixture)

# where each block type keeps its fp16 scale(s), as byte offsets (random bytes there could be inf/nan)
HALVES = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2),
          T.Q5_K: (0, 2), T.Q6_K: (208,)}
EXACT = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}  # -> bits of the codes


def random_blocks(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for at in HALVES.get(kind, ()):
        raw[:, at:at + 2] = (rng.random((raw.shape[0], 1)) * 0.02 + 0.001).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write(path, arch: str, tensors: dict, meta: dict | None = None):
    w = GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        getattr(w, key)(value)
    for name, (raw, kind, shape) in tensors.items():
        if kind in (T.F32, T.F16):
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", [*EXACT, T.Q6_K], ids=lambda k: k.name)
def test_each_block_type_decodes_to_the_files_values(tmp_path, kind):
    rows, cols = 40, 512
    raw = random_blocks(kind, rows, cols)
    gguf = GgufFile(write(tmp_path / "m.gguf", "llama", {"w": (raw, kind, (rows, cols))}))
    want = torch.from_numpy(dequantize(raw, kind).reshape(rows, cols).astype(np.float32))
    coded = gguf.coded("w")
    got = coded.dequantized()
    if kind in EXACT:  # the blocks' own levels: exact, and as few bits as the type has
        assert coded.state()["bits"] == EXACT[kind]
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    else:  # Q6_K's 16-value sub-blocks: the search's grid per 32, well inside a 6-bit step
        assert (got - want).abs().max() <= want.abs().max() / 250
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.allclose(coded.lookup(ids), want[ids], rtol=1e-6, atol=1e-7)


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama's q/k rows (convert_hf_to_gguf.py permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(model, path, arch: str, kinds=(T.Q8_0, T.Q4_0)):
    """A transformers model written as llama.cpp would (q/k interleaved for Llama), its
    matrices quantized (attention in kinds[0], MLP in kinds[1]); the model's weights are set
    to the values the file now holds, so its forward is the reference."""
    cfg, tensors = model.config, {}

    def put(name, weight, kind, heads=0):
        w = weight.detach().float().numpy()
        if heads and arch == "llama":
            w = llama_permute(w, heads)
        raw = quantize(w, kind) if kind != T.F32 else w
        tensors[name] = (raw, kind, w.shape)
        back = dequantize(raw, kind).reshape(w.shape) if kind != T.F32 else w
        if heads and arch == "llama":  # (undo, for the reference model)
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        with torch.no_grad():
            weight.copy_(torch.from_numpy(np.ascontiguousarray(back)))

    put("token_embd.weight", model.model.embed_tokens.weight, kinds[0])
    if not cfg.tie_word_embeddings:
        put("output.weight", model.lm_head.weight, kinds[0])
    put("output_norm.weight", model.model.norm.weight, T.F32)
    for i, layer in enumerate(model.model.layers):
        a, m, p = layer.self_attn, layer.mlp, f"blk.{i}."
        put(p + "attn_norm.weight", layer.input_layernorm.weight, T.F32)
        put(p + "ffn_norm.weight", layer.post_attention_layernorm.weight, T.F32)
        put(p + "attn_q.weight", a.q_proj.weight, kinds[0], cfg.num_attention_heads)
        put(p + "attn_k.weight", a.k_proj.weight, kinds[0], cfg.num_key_value_heads)
        put(p + "attn_v.weight", a.v_proj.weight, kinds[0])
        put(p + "attn_output.weight", a.o_proj.weight, kinds[0])
        for n, proj in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
            if proj.bias is not None:
                put(p + f"attn_{n}.bias", proj.bias, T.F32)
        put(p + "ffn_gate.weight", m.gate_proj.weight, kinds[1])
        put(p + "ffn_up.weight", m.up_proj.weight, kinds[1])
        put(p + "ffn_down.weight", m.down_proj.weight, kinds[1])
    meta = {"add_block_count": cfg.num_hidden_layers, "add_context_length": cfg.max_position_embeddings,
            "add_embedding_length": cfg.hidden_size, "add_feed_forward_length": cfg.intermediate_size,
            "add_head_count": cfg.num_attention_heads, "add_head_count_kv": cfg.num_key_value_heads,
            "add_layer_norm_rms_eps": cfg.rms_norm_eps,
            "add_rope_freq_base": cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
            else cfg.rope_theta}
    return write(path, arch, tensors, meta)


@pytest.mark.parametrize("build, arch", [(lambda: build_tiny_model(6)[0], "llama"), (tiny_qwen2, "qwen2")],
                         ids=["llama", "qwen2-biases"])
def test_a_whole_model_computes_its_dequantized_weights(tmp_path, lib, build, arch):
    model = build().eval()
    gguf = GgufFile(to_gguf(model, tmp_path / "m.gguf", arch))
    config = gguf.config()
    assert config is not None and config["model_type"] == arch
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert config[key] == getattr(model.config, key), key
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
    want = reference(model, IDS)
    fast = FastLM(weights(gguf, SimpleNamespace(**config)), capacity=64, int8=lib)
    assert all(la.qkv is None for la in fast.layers) and fast.head is None  # codes only
    computes(fast, want)
    plain = FastLM(weights(gguf, SimpleNamespace(**config)), capacity=64)  # llm.decode=fp32: the same values
    with torch.inference_mode():
        assert torch.allclose(plain.forward(IDS)[0], want[-1], rtol=1e-3, atol=1e-4)


def test_files_it_does_not_read_are_left_to_transformers(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    assert GgufFile.open(junk) is None
    raw = random_blocks(T.Q8_0, 4, 64)
    other = GgufFile(write(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (raw, T.Q8_0, (4, 64))}))
    assert other.config() is None  # not a Llama/Qwen2: converted by transformers instead
    partial = GgufFile(write(tmp_path / "partial.gguf", "llama", {"token_embd.weight": (raw, T.Q8_0, (4, 64))},
                             {"add_block_count": 2}))
    assert partial.config() is None  # a Llama missing its sizes: not guessed
    for keep in (40, len((tmp_path / "partial.gguf").read_bytes()) - 64):  # torn in the header, in the data
        torn = tmp_path / f"torn{keep}.gguf"
        torn.write_bytes((tmp_path / "partial.gguf").read_bytes()[:keep])
        assert GgufFile.open(torn) is None
