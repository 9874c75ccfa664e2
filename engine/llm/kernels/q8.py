"""Weight-only int8 linear layers for decoding on the CPU.

A decode step reads every weight once for one token, so it is bound by memory bandwidth:
SmolLM2-135M's fp32 weights are 540 MB per token. Stored as 8-bit codes with a scale and a
low value per 32 weights they are a quarter of that, and q8.c's loop (int8 -> fp32, fused multiply-add,
compiled with -O3 -march=native so it vectorises for the CPU it runs on) streams them
5-8x faster than fp32 `F.linear` (bench/text.py). Relative error per layer ~0.8%; the
bench reports the greedy top-1 agreement with fp32 over >2,000 tokens.

torch's own `_weight_int8pack_mm` would do the same, but on CPUs without AVX-512 (this
machine) it is 10-20x slower than fp32; fbgemm's dynamic int8 quantizes the activations
too and agreed with fp32 on only 38-93% of tokens (measured while choosing this).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("q8.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]  # (after the source: expf/sqrtf and their vector forms, libmvec)
GROUP = 32  # columns per scale
PANEL_COLUMNS = 256  # q8.c's KB: q8_gemm dequantizes this many columns at a time (a multiple of GROUP)
CHUNK = 4096  # rows quantized at a time (the search's temporaries stay ~10x one chunk)
_lib = None
_reason = ""


def _cpu_key() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(build_dir: Path) -> Path | None:
    """Compile q8.c into `build_dir` unless a build for this source, compiler and CPU is there
    (a warm start reuses it); None with `reason()` saying why when there is no compiler or it fails."""
    global _reason
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        _reason = "no C compiler (install gcc for the int8 decode kernel)"
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + LIBS).encode() + _cpu_key().encode()
                         + compiler.encode()).hexdigest()[:16]
    target = build_dir / f"libq8-{key}.so"
    if target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp), *LIBS], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        _reason = f"the int8 kernel did not compile ({type(exc).__name__}: {detail.decode(errors='replace')[:200]})"
        log.warning("%s; decoding in fp32", _reason)
        return None
    return target


def load(build_dir: Path):
    """The kernel library (built once into `build_dir`; one per process), or None (see `reason()`)."""
    global _lib
    if _lib is None and (target := build(build_dir)) is not None:
        lib = ctypes.CDLL(str(target))
        lib.q8_linear.restype = None
        lib.q8_linear.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6
        lib.q8_gemm.restype = None
        lib.q8_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
        lib.q8_quantize_x.restype = None
        lib.q8_quantize_x.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3
        lib.q8_linear_x8.restype = None
        lib.q8_linear_x8.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 5
        lib.q8_decode.restype = None
        lib.q8_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5
        lib.q8_scratch_floats.restype = ctypes.c_long
        lib.q8_scratch_floats.argtypes = [ctypes.c_int] * 7
        _lib = lib
    return _lib


def reason() -> str:
    return _reason


class Q8Linear:
    """One linear layer's weight as 8- or 4-bit codes in groups of GROUP columns, each group
    affine: its own scale and low value (x = low + scale * q). Weights dequantized from a GGUF
    lie on each block's evenly spaced levels; those levels are found and kept exactly (4 bits
    when no group uses more than 16, as Q4 blocks do), so the cpu profile's SmolLM2 (Q4_1
    layers, Q8_0 embedding) and Qwen2.5 (Q5/Q8 blocks) decode the very weights their files
    hold. Measured while choosing:
    symmetric int8 per row agreed with fp32 on 0.90 of greedy tokens, symmetric per 32 on
    0.97 and lost 3-4 of 60 quality items."""

    def __init__(self, weight, bias, lib, codes: dict | None = None, compact: bool = False) -> None:
        """`codes`: a `state()` saved earlier for this very weight (a warm start skips the search)."""
        self.rows, self.cols = weight.shape  # (a GGUF's coded weight has a shape, no values)
        self.group = GROUP if self.cols % GROUP == 0 else self.cols
        self.bias = bias.detach().float().contiguous() if bias is not None else None
        self.lib = lib
        if codes is not None:
            self.q, self.scale, self.low, self.bits = codes["q"], codes["scale"], codes["low"], int(codes["bits"])
        else:
            import torch

            w = weight.detach()
            parts = [self._quantize(w[i:i + CHUNK].float()) for i in range(0, self.rows, CHUNK)]  # bounded temporaries
            self.bits = max(bits for *_, bits in parts)  # one layout per layer: the widest part's
            parts = [(pack(unpack(q, bits), self.bits) if bits != self.bits else q, s, lo, bits)
                     for q, s, lo, bits in parts]
            self.q, self.scale, self.low = (torch.cat([p[k] for p in parts]).contiguous() for k in range(3))
        self._lay_out(compact)

    def _lay_out(self, compact: bool) -> None:
        """5-bit codes and exact fp16 scales when `compact`, else 8-bit codes and fp32 scales for
        5-bit blocks (fewer instructions per weight: see LLMConfig.compact_codes)."""
        import torch

        if compact:
            if self.bits == 8 and self.group == GROUP and width(self.q) == 5:
                self.q, self.bits = pack(self.q, 5), 5
            self.scale, self.low = _narrowed(self.scale, self.low)
            return
        if self.bits == 5:
            self.q, self.bits = unpack(self.q, 5).contiguous(), 8
        if self.scale.dtype == torch.float16:
            self.scale, self.low = self.scale.float(), self.low.float()

    @property
    def fmt(self) -> int:
        """`bits` as q8.c's kernels take it: with HALF when the scales and low values are fp16."""
        import torch

        return self.bits | (HALF if self.scale.dtype == torch.float16 else 0)

    def state(self) -> dict:
        return {"q": self.q, "scale": self.scale, "low": self.low, "bits": self.bits}

    def _quantize(self, w):
        """(codes, scale, low, bits) for some rows of the weight."""
        import torch

        rows = w.shape[0]
        blocks = w.reshape(rows, -1, self.group)
        grid = _levels(blocks)
        if grid is not None:  # a GGUF's blocks: exact, at 4 or 5 bits when no group has over 16 or 32 levels
            scale, low, codes = grid
            codes = codes.reshape(rows, self.cols)
            bits = width(codes) if self.group == 32 else 8
            return pack(codes, bits), scale, low, bits
        else:  # (weights from fp16/bf16 files) the closer of two grids per group: min..max in
            # 255 steps, or symmetric +-absmax in 254 steps (llama.cpp's Q8_0)
            low, high = blocks.amin(-1), blocks.amax(-1)
            step = ((high - low) / 255).clamp(min=1e-12)
            sym = (blocks.abs().amax(-1) / 127).clamp(min=1e-12)
            grids = [(step, low), (sym, -128 * sym)]
            codes = [torch.round((blocks - lo[..., None]) / sc[..., None]).clamp(0, 255) for sc, lo in grids]
            errors = [(lo[..., None] + q * sc[..., None] - blocks).abs().amax(-1) for (sc, lo), q in zip(grids, codes)]
            pick = errors[1] < errors[0]
            q = torch.where(pick[..., None], codes[1], codes[0]).to(torch.uint8).reshape(rows, self.cols)
            return q, torch.where(pick, sym, step), torch.where(pick, -128 * sym, low), 8

    def __call__(self, x):
        """x: [..., cols] fp32 -> [..., rows] fp32."""
        import torch

        flat = x.reshape(-1, self.cols).float().contiguous()
        out = torch.empty(flat.shape[0], self.rows, dtype=torch.float32)
        self.lib.q8_linear(flat.data_ptr(), self.q.data_ptr(), self.scale.data_ptr(), self.low.data_ptr(),
                           self.bias.data_ptr() if self.bias is not None else None, out.data_ptr(),
                           flat.shape[0], self.rows, self.cols, self.group, self.fmt, torch.get_num_threads())
        return out.view(*x.shape[:-1], self.rows)

    def many(self, x):
        """The same for a prompt's many tokens (compute-bound): q8.c's register-blocked matmul,
        dequantizing a few rows at a time, so no fp32 copy of the weight is kept."""
        import torch

        if PANEL_COLUMNS % self.group:  # (a row in one odd-sized group: tiny test models only)
            return self(x)
        flat = x.reshape(-1, self.cols).float()
        tokens = flat.shape[0]
        padded = -(-tokens // 8) * 8
        xt = torch.zeros(self.cols, padded, dtype=torch.float32)
        xt[:, :tokens] = flat.T
        out = torch.empty(tokens, self.rows, dtype=torch.float32)
        self.lib.q8_gemm(xt.data_ptr(), padded, self.q.data_ptr(), self.scale.data_ptr(), self.low.data_ptr(),
                         self.bias.data_ptr() if self.bias is not None else None, out.data_ptr(),
                         tokens, self.rows, self.cols, self.group, self.fmt, torch.get_num_threads())
        return out.view(*x.shape[:-1], self.rows)

    def x8(self, x):
        """The same with the activations quantized per 32 to int8 (q8.c q8_linear_x8: what a
        decode step runs with llm.activations=int8)."""
        import torch

        flat = x.reshape(-1, self.cols).float().contiguous()
        tokens, groups = flat.shape[0], self.cols // GROUP
        if self.group != GROUP:
            raise ValueError("int8 activations need groups of 32 columns")
        xq = torch.empty(tokens, self.cols, dtype=torch.int8)
        dx, xsum = torch.empty(tokens, groups), torch.empty(tokens, groups)
        self.lib.q8_quantize_x(flat.data_ptr(), tokens, self.cols, xq.data_ptr(), dx.data_ptr(), xsum.data_ptr())
        out = torch.empty(tokens, self.rows, dtype=torch.float32)
        self.lib.q8_linear_x8(xq.data_ptr(), dx.data_ptr(), xsum.data_ptr(), self.q.data_ptr(), self.scale.data_ptr(),
                              self.low.data_ptr(), self.bias.data_ptr() if self.bias is not None else None,
                              out.data_ptr(), tokens, self.rows, self.cols, self.fmt, torch.get_num_threads())
        return out.view(*x.shape[:-1], self.rows)

    def dequantized(self):
        """The weight this layer computes with, in fp32 (tests compare against it)."""
        return dequantize(self.state(), self.rows, self.cols)

    def lookup(self, ids):
        """Rows `ids` of the weight in fp32: an embedding kept as codes."""
        rows = {"q": self.q[ids], "scale": self.scale[ids], "low": self.low[ids], "bits": self.bits}
        return dequantize(rows, len(ids), self.cols)


HALF = 0x100  # q8.c: scales and low values in fp16
ACTIVATIONS = {"fp32": 0, "int8": 1}  # llm.activations -> q8.c's model.x8


def _narrowed(scale, low):
    """fp16 scales and low values when that loses nothing (a GGUF's Q5_0 and Q8_0 blocks: an fp16
    scale, and low = -16 or -128 times it): a group then costs 4 bytes of them, not 8."""
    import torch

    if scale.dtype == torch.float16:
        return scale, low
    s16, l16 = scale.half(), low.half()
    if torch.isfinite(s16).all() and torch.isfinite(l16).all() and torch.equal(s16.float(), scale) \
            and torch.equal(l16.float(), low):
        return s16.contiguous(), l16.contiguous()
    return scale, low


def width(codes) -> int:
    """The narrowest layout that holds these codes (groups of 32): 4, 5 or 8 bits."""
    top = int(codes.max()) if codes.numel() else 0
    return 4 if top <= 15 else 5 if top <= 31 else 8


def pack(codes, bits: int):
    """[rows, cols] codes -> the kernel's layout (q8.c): 8 bits, one per byte; 4 bits, groups of 32
    in 16 bytes (byte j = code j | code j+16 << 4); 5 bits, groups of 32 in 20 bytes (those 16
    bytes of low four bits, then 4 bytes holding each code's fifth bit, bit i for code i)."""
    import torch

    if bits == 8:
        return codes.contiguous()
    rows, cols = codes.shape
    pairs = (codes & 15).view(rows, -1, 2, 16)
    nibbles = pairs[:, :, 0] | (pairs[:, :, 1] << 4)  # [rows, groups, 16]
    if bits == 4:
        return nibbles.reshape(rows, cols // 2).contiguous()
    fifth = ((codes >> 4) & 1).view(rows, -1, 4, 8).to(torch.int32)
    high = (fifth << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)  # [rows, groups, 4]
    return torch.cat([nibbles, high], -1).reshape(rows, -1).contiguous()


def unpack(q, bits: int):
    """The kernel's layout -> [rows, cols] codes (uint8)."""
    import torch

    if bits == 8:
        return q
    rows = q.shape[0]
    g = q.view(rows, -1, group_bytes(bits))
    nib = g[:, :, :16]
    codes = torch.stack([nib & 15, nib >> 4], -2).reshape(rows, -1, 32)
    if bits == 5:
        high = ((g[:, :, 16:, None].to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(rows, -1, 32)
        codes = codes | (high.to(torch.uint8) << 4)
    return codes.reshape(rows, -1)


def group_bytes(bits: int) -> int:
    return {4: 16, 5: 20, 8: 32}[bits]


def pack4(codes):
    """[rows, cols] codes 0-15 -> 4-bit layout (pack(codes, 4))."""
    return pack(codes, 4)


def unpack4(packed):
    return unpack(packed, 4)


def dequantize(state: dict, rows: int, cols: int):
    """A layer's codes ({q, scale, low, bits}) -> its [rows, cols] fp32 weight."""
    q = unpack(state["q"], state["bits"])
    groups = state["scale"].shape[-1]
    q = q.float().reshape(rows, groups, cols // groups)
    return (state["low"].float()[..., None] + q * state["scale"].float()[..., None]).reshape(rows, cols)


def _levels(blocks):
    """(scale, low, codes) when every group of `blocks` [rows, groups, group] lies exactly on at
    most 256 evenly spaced levels (each block of a 4-, 5-, 6- or 8-bit GGUF tensor does), else None.
    The spacing is the smallest gap between a group's values and the base its smallest value:
    a block's extreme levels are often unused, so its min and max need not be codes 0 and 15."""
    import torch

    tol = float(blocks.abs().max()) * 1e-6 + 1e-30
    ordered = blocks.sort(-1).values
    gaps = ordered[..., 1:] - ordered[..., :-1]
    step = torch.where(gaps > tol, gaps, torch.full_like(gaps, float("inf"))).amin(-1)
    step = torch.where(torch.isinf(step), torch.ones_like(step), step)  # a constant group
    low = ordered[..., 0]
    codes = torch.round((blocks - low[..., None]) / step[..., None])
    if bool((codes > 255).any()):
        return None
    top = codes.amax(-1)
    step = torch.where(top > 0, (ordered[..., -1] - low) / top.clamp(min=1), step)  # the spacing, from the widest span
    off = (low[..., None] + codes * step[..., None] - blocks).abs()
    if bool((off > step[..., None] * 1e-3 + tol).any()):  # a value off its level: not a grid
        return None
    return step.contiguous(), low.contiguous(), codes.to(torch.uint8)


# ---- a whole decode step in C (q8.c: q8_decode) --------------------------------------------

class _Mat(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("low", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int), ("cols", ctypes.c_int),
                ("group", ctypes.c_int), ("bits", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("qkv", _Mat), ("o", _Mat),
                ("gate_up", _Mat), ("down", _Mat), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("capacity", ctypes.c_int),
                ("n_layers", ctypes.c_int), ("threads", ctypes.c_int), ("x8", ctypes.c_int), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("norm", ctypes.c_void_p),
                ("head", _Mat), ("scratch", ctypes.c_void_p)]


def _mat(layer: Q8Linear) -> _Mat:
    bias = layer.bias.data_ptr() if layer.bias is not None else None
    return _Mat(layer.q.data_ptr(), layer.scale.data_ptr(), layer.low.data_ptr(), bias,
                layer.rows, layer.cols, layer.group, layer.fmt)


class Decoder:
    """One decode step of a FastLM in a single C call (its int8 weights, its KV slots): B tokens,
    each of its own sequence, through every layer, each weight row read once for all of them
    (continuous batching, engine/llm/scheduler.py). ctypes lets go of the GIL for the call."""

    def __init__(self, fast) -> None:
        import torch

        ptr = lambda t: t.data_ptr()  # noqa: E731 (every tensor here is contiguous fp32 and outlives the Decoder)
        self.lib = fast.int8
        inter = fast.layers[0].q8["gate_up"].rows // 2
        self.max_batch = fast.slots
        self._layers = (_Layer * len(fast.layers))(*[
            _Layer(ptr(la.ln1), ptr(la.ln2), _mat(la.q8["qkv"]), _mat(la.q8["o"]), _mat(la.q8["gate_up"]),
                   _mat(la.q8["down"]), ptr(la.k), ptr(la.v)) for la in fast.layers])
        floats = self.lib.q8_scratch_floats(fast.hidden, fast.heads, fast.kv_heads, fast.head_dim, inter,
                                            fast.capacity, self.max_batch)
        self.scratch = torch.empty(floats, dtype=torch.float32)
        self.logits = torch.empty(self.max_batch, fast.q8_head.rows, dtype=torch.float32)
        self.model = _Model(fast.hidden, fast.heads, fast.kv_heads, fast.head_dim, inter, fast.capacity,
                            len(fast.layers), torch.get_num_threads(), int(fast.x8), fast.eps, fast.scale, self._layers,
                            ptr(fast.norm), _mat(fast.q8_head), ptr(self.scratch))
        self._ref = ctypes.byref(self.model)

    def __call__(self, x, slots: list[int], positions: list[int], cos, sin):
        """x: the tokens' embeddings, [B, hidden] fp32 (overwritten); slots/positions: each token's
        KV slot (all different) and position; cos/sin: [B, head_dim]. Logits [B, vocab]."""
        batch = len(slots)
        if not 0 < batch <= self.max_batch or len(set(slots)) != batch:
            raise ValueError(f"a decode step takes 1 to {self.max_batch} tokens of different slots")
        s = (ctypes.c_int * batch)(*slots)
        p = (ctypes.c_int * batch)(*positions)
        self.lib.q8_decode(self._ref, x.data_ptr(), batch, s, p, cos.data_ptr(), sin.data_ptr(),
                           self.logits.data_ptr())
        return self.logits[:batch].clone()
