"""A GGUF file's blocks straight into the fast path's codes, without converting the model.

The cpu profile's models come as GGUF files (llama.cpp's format: weights in blocks of 32
or 256 values, each block a few bits per value plus its scale). transformers reads one by
dequantizing every tensor to fp32 and building the whole model (Qwen2.5-0.5B: ~55 s and
2.5 GB on this 2-core machine, then 15 s more to find the blocks' codes again). Most block
types are already what engine/llm/kernels/q8.py computes with: per 32 weights, one scale,
one low value and small integer codes. This module reads those directly:

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K: the codes and each 32-group's scale and low
  value, taken from the block headers (exact: the same values llama.cpp computes with);
- other types (Q6_K's 16-value sub-blocks, Q2_K, Q3_K, F16, BF16, F32): dequantized by
  the `gguf` package and coded by Q8Linear's own search, as a converted model would be.

Only the header is parsed here (the tokenizer is converted once by transformers,
engine/llm/loading.py); the tensor data stays mapped from the file.
"""
from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

from engine.llm.fastpath import ARCHS, Coded, LazyLayers, Rope, Weights

ARCH_CLASSES = {arch: cls for cls, arch in ARCHS.items()}  # "llama" -> "LlamaForCausalLM"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
ROWS_AT_ONCE = 4096  # rows dequantized at a time (bounded temporaries)


class GgufFile:
    """One GGUF file: its metadata (scalars; arrays as their length, except short ones) and
    where each tensor's blocks lie."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        self.path = Path(path)
        self.blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.meta, self.tensors = _parse(self.blob)
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        for name, (kind, shape, offset) in self.tensors.items():  # a torn file is not read here
            per, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            count = int(np.prod(shape, dtype=np.int64))
            if count % per or offset + count // per * size > len(self.blob):
                raise ValueError(f"{name} lies past the end of {self.path.name}")

    @classmethod
    def open(cls, path: Path) -> "GgufFile | None":
        """The file, or None when it is not a GGUF this module reads (the caller converts it)."""
        try:
            return cls(path)
        except (OSError, ValueError, KeyError, struct.error):
            return None

    @property
    def arch(self) -> str:
        return str(self.meta.get("general.architecture", ""))

    def config(self) -> dict | None:
        """config.json for a plain dense Llama/Qwen2 model (the fast path's shape, default RoPE),
        from the file's own keys; None for anything else (a key missing or malformed too:
        transformers' conversion then says what is wrong with the file)."""
        try:
            return self._config()
        except (KeyError, ValueError, TypeError, IndexError):
            return None

    def _config(self) -> dict | None:
        a, m = self.arch, self.meta
        if a not in ARCH_CLASSES or f"{a}.rope.scaling.type" in m or f"{a}.expert_count" in m:
            return None
        heads = int(m[f"{a}.attention.head_count"])
        hidden = int(m[f"{a}.embedding_length"])
        embed_rows = self.tensors["token_embd.weight"][1][0]
        config = {
            "architectures": [ARCH_CLASSES[a]], "model_type": a, "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": int(m[f"{a}.feed_forward_length"]),
            "num_hidden_layers": int(m[f"{a}.block_count"]), "num_attention_heads": heads,
            "num_key_value_heads": int(m.get(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(m.get(f"{a}.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(m[f"{a}.attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(m.get(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m.get(f"{a}.context_length", 2048)),
            "vocab_size": int(m.get(f"{a}.vocab_size", embed_rows)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"), "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        }
        if config["head_dim"] * heads != hidden or f"{a}.rope.dimension_count" in m and \
                int(m[f"{a}.rope.dimension_count"]) != config["head_dim"]:
            return None  # (partial rotary: not this path's shape)
        return config

    def coded(self, name: str, unpermute: int = 0) -> Coded:
        """A 2-D tensor as the kernel's codes (computed when first asked for); `unpermute`:
        the head count whose rows llama.cpp's converter interleaved (Llama's q and k)."""
        _, shape, _ = self.tensors[name]
        return Coded(shape[0], shape[1], lambda: _unpermuted(self._codes(name), unpermute),
                     lookup=None if unpermute else lambda ids: self.rows(name, ids))

    def rows(self, name: str, ids):
        """Rows `ids` of a tensor in fp32 (an embedding's: only those blocks are read)."""
        import torch

        raw = self._raw(name, 0, self.tensors[name][1][0])[ids.numpy()]
        return torch.from_numpy(self._dequantize(name, raw).reshape(len(ids), -1).astype("float32", copy=False))

    def vector(self, name: str):
        """A small tensor (a norm, a bias) in fp32."""
        import torch

        _, shape, _ = self.tensors[name]
        return torch.from_numpy(self._values(name, 0, shape[0] if len(shape) > 1 else 1).copy()).reshape(shape)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _raw(self, name: str, first: int, count: int):
        """Rows [first, first + count) of a tensor as raw bytes, [count, bytes per row]."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        kind, shape, offset = self.tensors[name]
        per, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        cols = shape[-1]
        row_bytes = cols // per * size
        start = offset + first * row_bytes
        return self.blob[start:start + count * row_bytes].reshape(count, row_bytes)

    def _values(self, name: str, first: int, count: int):
        return self._dequantize(name, self._raw(name, first, count)).reshape(count, -1)

    def _dequantize(self, name: str, raw):
        import numpy as np
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        kind = GGMLQuantizationType(self.tensors[name][0])
        if kind == GGMLQuantizationType.BF16:  # (not in gguf.quants.dequantize)
            return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return dequantize(np.ascontiguousarray(raw), kind)

    def _codes(self, name: str) -> dict:
        import torch

        from engine.llm.kernels.q8 import Q8Linear

        kind, (rows, cols), _ = self.tensors[name]
        parts = []
        for first in range(0, rows, ROWS_AT_ONCE):
            count = min(ROWS_AT_ONCE, rows - first)
            raw = self._raw(name, first, count)
            values = torch.from_numpy(self._dequantize(name, raw).reshape(count, cols).astype("float32", copy=False))
            header = _affine(kind, raw, cols) if cols % 32 == 0 else None
            if header is None:  # no 32-group affine header: the search (as for a converted model)
                parts.append(Q8Linear(values, None, None).state())
                continue
            scale, low = header
            step = torch.where(scale == 0, torch.ones_like(scale), scale)
            codes = torch.round((values.view(count, -1, 32) - low[..., None]) / step[..., None]).clamp(0, 255)
            parts.append({"q": codes.to(torch.uint8).reshape(count, cols), "scale": scale, "low": low, "bits": 8})
        return _packed(_joined(parts))


def cat(parts: list[Coded]) -> Coded:
    """Several coded weights stacked by rows (fused q/k/v, gate/up)."""
    return Coded(sum(p.shape[0] for p in parts), parts[0].shape[1], lambda: _joined([p.state() for p in parts]))


def weights(gguf: GgufFile, config: SimpleNamespace) -> Weights:
    """The fast path's weights from the file: every matrix coded, the norms and biases in fp32."""
    cfg = config
    llama = gguf.arch == "llama"  # (llama.cpp interleaves Llama's q/k rows for its RoPE)
    embed = gguf.coded("token_embd.weight")
    head = embed if not gguf.has("output.weight") else gguf.coded("output.weight")

    def layer(i: int) -> dict:
        p = f"blk.{i}."
        bias = [p + f"attn_{n}.bias" for n in "qkv"]
        qkv_bias = None
        if any(gguf.has(b) for b in bias):
            import torch

            qkv_bias = torch.cat([gguf.vector(b) if gguf.has(b) else torch.zeros(gguf.tensors[b.replace("bias", "weight")][1][0])
                                  for b in bias])
        q = gguf.coded(p + "attn_q.weight", cfg.num_attention_heads if llama else 0)
        k = gguf.coded(p + "attn_k.weight", cfg.num_key_value_heads if llama else 0)
        optional = lambda name: gguf.vector(name) if gguf.has(name) else None  # noqa: E731
        return {"ln1": gguf.vector(p + "attn_norm.weight"), "ln2": gguf.vector(p + "ffn_norm.weight"),
                "qkv": cat([q, k, gguf.coded(p + "attn_v.weight")]), "qkv_bias": qkv_bias,
                "o": gguf.coded(p + "attn_output.weight"), "o_bias": optional(p + "attn_output.bias"),
                "gate_up": cat([gguf.coded(p + "ffn_gate.weight"), gguf.coded(p + "ffn_up.weight")]),
                "down": gguf.coded(p + "ffn_down.weight"), "down_bias": optional(p + "ffn_down.bias")}

    return Weights(cfg, embed, gguf.vector("output_norm.weight"), head, Rope(cfg.head_dim, cfg.rope_theta),
                   LazyLayers(layer, cfg.num_hidden_layers), shared=False)


def _affine(kind: int, raw, cols: int):
    """(scale, low) per 32 weights, [rows, cols / 32] fp32, from the blocks' headers, for the
    types whose 32-groups are affine (x = low + scale * code); None for the rest."""
    import numpy as np
    import torch
    from gguf.constants import GGMLQuantizationType as T

    rows = raw.shape[0]
    kind = T(kind)

    def half(blocks, at):
        return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)[:, 0]

    if kind in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        size = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24, T.Q8_0: 34}[kind]
        blocks = raw.reshape(-1, size)
        d = half(blocks, 0)
        low = {T.Q4_0: -8 * d, T.Q5_0: -16 * d, T.Q8_0: -128 * d}.get(kind)
        if low is None:  # Q4_1, Q5_1: their own minimum
            low = half(blocks, 2)
        scale = d
    elif kind in (T.Q4_K, T.Q5_K):
        from gguf.quants import Q4_K

        size = 144 if kind == T.Q4_K else 176
        blocks = raw.reshape(-1, size)
        d, dmin = half(blocks, 0)[:, None], half(blocks, 2)[:, None]
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # (Q5_K packs its scales the same way)
        scale, low = d * sc.astype(np.float32), -dmin * m.astype(np.float32)
    else:
        return None
    return (torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(rows, cols // 32),
            torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32)).reshape(rows, cols // 32))


def _joined(parts: list[dict]) -> dict:
    """States stacked by rows; one layout for all (8-bit when any part is)."""
    import torch

    from engine.llm.kernels.q8 import pack, unpack

    if len(parts) == 1:
        return parts[0]
    bits = max(p["bits"] for p in parts)
    q = [p["q"] if p["bits"] == bits else pack(unpack(p["q"], p["bits"]), bits) for p in parts]
    return {"q": torch.cat(q).contiguous(), "scale": torch.cat([p["scale"] for p in parts]).contiguous(),
            "low": torch.cat([p["low"] for p in parts]).contiguous(), "bits": bits}


def _packed(state: dict) -> dict:
    """4- or 5-bit codes when no code is over 15 or 31 (Q4 and Q5 blocks), as Q8Linear lays them out."""
    from engine.llm.kernels.q8 import pack, width

    if state["bits"] == 8 and state["q"].shape[1] % 32 == 0 and (bits := width(state["q"])) < 8:
        return {**state, "q": pack(state["q"], bits), "bits": bits}
    return state


def _unpermuted(state: dict, heads: int) -> dict:
    """Undo llama.cpp's interleaving of q/k rows for Llama (transformers' reverse_permute)."""
    if not heads:
        return state
    import torch

    rows = state["scale"].shape[0]
    order = torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
    return {**state, "q": state["q"][order].contiguous(), "scale": state["scale"][order].contiguous(),
            "low": state["low"][order].contiguous()}


def _parse(blob) -> tuple[dict, dict]:
    """(metadata, {tensor name: (ggml type, shape in torch order, absolute offset)})."""
    data = memoryview(blob)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, tensors, keys = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version}")
    pos, meta = 24, {}

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        return bytes(data[pos + 8:pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n

    def value(kind, pos, keep=True):
        if kind in _SCALAR:
            fmt = _SCALAR[kind]
            return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            inner, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if inner in _SCALAR and not (keep and count <= 64):  # a long numeric array: its length only
                return count, pos + count * struct.calcsize(_SCALAR[inner])
            items = []
            for _ in range(count):
                item, pos = value(inner, pos, keep and count <= 64)
                if keep and count <= 64:
                    items.append(item)
            return (items if keep and count <= 64 else count), pos
        raise ValueError(f"GGUF value type {kind}")

    for _ in range(keys):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        meta[key], pos = value(kind, pos + 4)
    infos = {}
    for _ in range(tensors):
        name, pos = string(pos)
        (dims,) = struct.unpack_from("<I", data, pos)
        shape = struct.unpack_from(f"<{dims}Q", data, pos + 4)
        kind, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        infos[name] = (kind, tuple(reversed(shape)), offset)
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    return meta, {name: (kind, shape, start + offset) for name, (kind, shape, offset) in infos.items()}
