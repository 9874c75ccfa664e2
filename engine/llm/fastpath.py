"""A lean decode path for dense Llama-family models (Llama, SmolLM2, Qwen2/2.5).

transformers' eager forward spends most of a small model's decode step in Python and
bookkeeping (cache classes, masks, hooks, ~25 modules per layer), not in the matmuls:
SmolLM2-135M streams its weights in ~20 ms of CPU time per token but the forward costs
~60. This module runs the same weights with about a dozen tensor ops per layer:

- q/k/v and gate/up are fused into one matmul each; the model's own linear layers are
  re-pointed at views of the fused tensors, so nothing is stored twice;
- a static KV cache: one preallocated tensor per layer (pages are only touched as the
  conversation grows), written in place; prefix reuse is "set the length";
- rotary embeddings from the model's own `rotary_emb` (so scaled RoPE variants work);
- `int8`: the weights as 4/8-bit codes in groups of 32 (the GGUF's own blocks, found
  again); a decode step (one token) runs every layer in one C call (engine/llm/kernels/q8.c
  `q8_decode`: norms, RoPE, the KV cache, attention, the int8 matvecs), since on a 135M
  model the ~15 torch ops per layer cost as much as the matvecs; 2-4 tokens use the int8
  matvec from torch; prompts (many tokens at once, compute-bound) use q8.c's register-
  blocked fp32 matmul, dequantizing the codes a panel at a time (as fast as BLAS on the
  fp32 weight, bench/text.py), so a checkpoint read by engine/llm/lean.py keeps no fp32
  copy of its matrices at all: Qwen2.5-0.5B is ~0.4 GB of codes instead of 2 GB + codes.

Anything else (MoE, omni/VLM backbones, bitsandbytes layers, a talker that needs
hidden states) keeps transformers' forward: `FastLM.attach` returns None for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SMALL = 4  # up to this many tokens in one forward use the int8 kernel (it is bandwidth-bound, BLAS is not)


@dataclass
class Weights:
    """One model's tensors in the layout this path computes: from a transformers model
    (`FastLM.attach`) or straight from a checkpoint's files (engine/llm/lean.py)."""

    config: object  # hidden_size, rms_norm_eps, num_attention_heads, num_key_value_heads, head_dim
    embed: object  # [vocab, hidden]
    norm: object
    head: object  # [vocab, hidden]; the embedding itself when tied
    rotary: Callable  # (x, positions) -> (cos, sin)
    # ln1, ln2, qkv(+_bias), o(+_bias), gate_up, down(+_bias); any iterable of them (lean.py reads each on demand)
    layers: Iterable[dict] = field(default_factory=list)
    # the fp32 tensors are also a transformers model's (`FastLM.attach`): they take the codes'
    # values, so its forward computes the same model. False (lean.py): this path alone reads
    # them, and with int8 codes the fp32 matrices are dropped as soon as they are coded.
    shared: bool = True


class LazyLayers:
    """A model's layers, each read when the fast path reaches it (`read(i)` -> the layer's dict):
    it codes one and drops its fp32 matrices before the next is read, so a load never holds
    them all (engine/llm/lean.py, engine/llm/gguf_blocks.py)."""

    def __init__(self, read: Callable[[int], dict], count: int) -> None:
        self.read, self.count = read, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return (self.read(i) for i in range(self.count))


class FastLM:
    """Owns the static KV cache, in `slots` slots of `capacity` positions (one per sequence being
    served: engine/llm/scheduler.py); `forward(ids, slot)` appends a slot's tokens and returns the
    last logits, `step(slots, tokens)` runs one token for each of several slots at once."""

    def __init__(self, weights: Weights, capacity: int, int8=None, codes_path=None, slots: int = 1,
                 x8: int = 0, compact: bool = False) -> None:
        import torch

        cfg = weights.config
        self.capacity, self.slots = capacity, max(1, slots)
        self.lengths = [0] * self.slots  # positions held, per slot
        #: a decode step's activations quantized per 32 to int8 (kernels/q8.c q8_linear_x8), else fp32
        self.x8 = int(x8)
        self.compact = compact  # 5-bit codes and fp16 scales where the blocks allow (LLMConfig.compact_codes)
        self.hidden, self.eps = cfg.hidden_size, cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.rotary, self.norm = weights.rotary, weights.norm
        self.device, dtype = self.norm.device, self.norm.dtype
        self.int8 = int8 if self.device.type == "cpu" and dtype == torch.float32 else None  # q8.load()'s library
        # the int8 codes found at the first start, kept in the data dir: a warm start reads them
        self._codes = _read_codes(codes_path) if self.int8 is not None else None
        self._found: list[dict] = []
        self.shared = weights.shared
        self.layers = [_Layer(parts, self) for parts in weights.layers]
        self.q8_head = self._q8(weights.head, None)
        # an embedding given as codes (a GGUF's, engine/llm/gguf_blocks.py): the rows a prompt
        # uses are looked up (from the tied head's codes, or from the file), never all held
        self.lookup = None
        if isinstance(weights.embed, Coded):
            tied = weights.embed is weights.head and self.q8_head is not None
            self.lookup = self.q8_head.lookup if tied else weights.embed.lookup
        self.embed = None if self.lookup is not None else _values(weights.embed)
        self.head = _values(weights.head) if self.int8 is None or self.shared else None  # (else: from its codes)
        if self.int8 is not None and codes_path is not None and self._codes is None:
            _write_codes(codes_path, self._found)
        self._codes = self._found = None
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        for layer in self.layers:  # untouched pages of an empty tensor cost no memory
            layer.k = torch.empty(shape, dtype=dtype, device=self.device)
            layer.v = torch.empty(shape, dtype=dtype, device=self.device)
        self.decoder = None  # int8: a decode step's every layer in one C call (kernels/q8.py)
        if self.int8 is not None:
            from engine.llm.kernels.q8 import Decoder

            self.decoder = Decoder(self)

    def _q8(self, weight, bias):
        """The int8 copy of a weight. A shared fp32 weight is set to its dequantized values, so
        transformers' own forward computes the same model as the codes do."""
        from engine.llm.kernels.q8 import Q8Linear

        if self.int8 is None:
            return None
        saved = self._codes[len(self._found)] if self._codes is not None else None
        if saved is None and isinstance(weight, Coded):
            saved = weight.state()
        layer = Q8Linear(weight, bias, self.int8, codes=saved, compact=self.compact)
        self._found.append(layer.state())
        if self.shared:
            weight.data.copy_(layer.dequantized())
        return layer

    def linear(self, x, weight, bias, q8, count: int):
        """x @ weight.T + bias: from the codes with int8 (a matvec for a few tokens, a
        matmul for a prompt), else fp32 BLAS."""
        import torch.nn.functional as F

        if q8 is not None:
            return q8(x) if count <= SMALL else q8.many(x)
        return F.linear(x, weight, bias)

    @classmethod
    def attach(cls, model, capacity: int, int8=None, codes_path=None, slots: int = 1,
               x8: int = 0, compact: bool = False) -> "FastLM | None":
        """A FastLM for a transformers `model`, or None when its architecture or layers are not
        the plain Llama/Qwen2 shape this path computes (the caller keeps transformers' forward).
        The model's q/k/v and gate/up become views of the fused weights: it keeps working."""
        import torch

        cfg = model.config
        if not plain_config(type(model).__name__, cfg):
            return None
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if any(type(lin) is not torch.nn.Linear for lin in linears):  # bitsandbytes, MoE, ...
                return None
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            layers.append({"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                           "qkv": qkv, "qkv_bias": qkv_bias, "o": attn.o_proj.weight, "o_bias": attn.o_proj.bias,
                           "gate_up": _fuse(mlp.gate_proj, mlp.up_proj)[0],
                           "down": mlp.down_proj.weight, "down_bias": mlp.down_proj.bias})
        weights = Weights(cfg, model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight,
                          model.model.rotary_emb, layers)
        return cls(weights, capacity, int8, codes_path, slots, x8, compact)

    @property
    def length(self) -> int:
        """Positions held in slot 0 (a one-sequence user's view)."""
        return self.lengths[0]

    def crop(self, length: int, slot: int = 0) -> None:
        """Keep the first `length` positions of a slot (prefix reuse across turns)."""
        self.lengths[slot] = max(0, min(length, self.lengths[slot]))

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` takes the first `length` positions of slot `src` (a conversation's prefix,
        or the primed system prompt, for a new sequence in another slot)."""
        length = min(length, self.lengths[src])
        if src != dst:
            for layer in self.layers:
                layer.k[dst, :, :length] = layer.k[src, :, :length]
                layer.v[dst, :, :length] = layer.v[src, :, :length]
        self.lengths[dst] = length

    def _embed(self, ids):
        import torch
        import torch.nn.functional as F

        if self.lookup is not None:
            return self.lookup(torch.tensor(ids)).unsqueeze(0)
        return F.embedding(torch.tensor([ids], device=self.device), self.embed)

    def step(self, slots: list[int], tokens: list[int]):
        """One token for each of several slots (all different) at once: logits [B, vocab]. With
        the C kernel each weight row is read once for the whole batch; without it (fp32), one
        slot after another."""
        import torch

        if self.decoder is None:
            return torch.cat([self.forward([t], s) for s, t in zip(slots, tokens)])
        starts = [self.lengths[s] for s in slots]
        if any(p >= self.capacity for p in starts):
            raise ValueError(f"the context holds {self.capacity} tokens")
        x = self._embed(tokens)
        cos, sin = self.rotary(x, torch.tensor([starts], device=self.device))
        logits = self.decoder(x[0].contiguous(), slots, starts, cos[0].contiguous(), sin[0].contiguous())
        for s in slots:
            self.lengths[s] += 1
        return logits

    def forward(self, ids, slot: int = 0) -> "object":
        """Run `ids` (a list of token ids) after the slot's cached positions; logits of the last
        one, [1, vocab]."""
        import torch
        import torch.nn.functional as F

        start, count = self.lengths[slot], len(ids)
        if start + count > self.capacity:
            raise ValueError(f"the context holds {self.capacity} tokens")
        if count == 1 and self.decoder is not None:
            return self.step([slot], ids)
        x = self._embed(ids)
        positions = torch.arange(start, start + count, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = None
        if count > 1:  # a causal mask offset by the cached positions
            keys = torch.arange(start + count, device=self.device)
            mask = keys.unsqueeze(0) <= positions.view(-1, 1)
        for layer in self.layers:
            x = layer(x, start, count, cos, sin, mask, slot)
        x = F.rms_norm(x[:, -1:], (self.hidden,), self.norm, self.eps)
        self.lengths[slot] = start + count
        return self.linear(x, self.head, None, self.q8_head, 1)[:, -1].float()


def plain_config(arch: str, cfg) -> bool:
    """Whether a model of class `arch` with config `cfg` (a transformers config, or a
    config.json read as attributes) has the plain dense Llama/Qwen2 shape computed here."""
    if ARCHS.get(arch) != getattr(cfg, "model_type", None) or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    return not getattr(cfg, "use_sliding_window", False) and getattr(cfg, "pretraining_tp", 1) == 1


class _Layer:
    def __init__(self, parts: dict, fast: FastLM) -> None:
        import torch

        self.fast = fast
        self.ln1, self.ln2 = parts["ln1"], parts["ln2"]
        self.qkv_bias, self.o_bias, self.down_bias = parts["qkv_bias"], parts["o_bias"], parts["down_bias"]
        self.q8 = {name: fast._q8(parts[name], parts.get(name + "_bias")) for name in ("qkv", "o", "gate_up", "down")}
        if fast.int8 is not None and not fast.shared:  # computed from the codes alone (FastLM.linear)
            self.qkv = self.o = self.gate_up = self.down = None
        else:
            self.qkv, self.o, self.gate_up, self.down = (_values(parts[n]) for n in ("qkv", "o", "gate_up", "down"))
        q, kv = fast.heads * fast.head_dim, fast.kv_heads * fast.head_dim
        self.split = [q, kv, kv]
        self.k = self.v = torch.empty(0)

    def __call__(self, x, start, count, cos, sin, mask, slot):
        import torch.nn.functional as F

        f = self.fast
        cache_k, cache_v = self.k[slot:slot + 1], self.v[slot:slot + 1]
        h = F.rms_norm(x, (f.hidden,), self.ln1, f.eps)
        q, k, v = f.linear(h, self.qkv, self.qkv_bias, self.q8["qkv"], count).split(self.split, -1)
        q = _rope(q.view(1, count, f.heads, f.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(1, count, f.kv_heads, f.head_dim).transpose(1, 2), cos, sin)
        end = start + count
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v.view(1, count, f.kv_heads, f.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, cache_k[:, :, :end], cache_v[:, :, :end], attn_mask=mask,
                                           scale=f.scale, enable_gqa=f.kv_heads != f.heads)
        x = x + f.linear(a.transpose(1, 2).reshape(1, count, -1), self.o, self.o_bias, self.q8["o"], count)
        h = F.rms_norm(x, (f.hidden,), self.ln2, f.eps)
        gate, up = f.linear(h, self.gate_up, None, self.q8["gate_up"], count).chunk(2, -1)
        return x + f.linear(F.silu(gate) * up, self.down, self.down_bias, self.q8["down"], count)


class Rope:
    """Default rotary embeddings, as transformers computes them (Llama/Qwen2, no scaling)."""

    def __init__(self, dim: int, theta: float) -> None:
        import torch

        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    def __call__(self, x, positions):
        import torch

        freqs = positions[:, :, None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Coded:
    """A weight given as the int8 kernel's codes ({q, scale, low, bits}: kernels/q8.py
    Q8Linear's state), made on first use (engine/llm/gguf_blocks.py reads a GGUF's blocks
    into them); `shape` as the fp32 tensor it stands for."""

    def __init__(self, rows: int, cols: int, make: Callable[[], dict], lookup: Callable | None = None) -> None:
        self.shape, self._make, self._state = (rows, cols), make, None
        self.lookup = lookup  # ids -> those rows in fp32, without making the codes (an embedding)

    def state(self) -> dict:
        if self._state is None:
            self._state = self._make()
        return self._state

    def dequantized(self):
        """Its fp32 values (llm.decode=fp32, and tests)."""
        from engine.llm.kernels.q8 import dequantize

        return dequantize(self.state(), *self.shape)


def _values(weight):
    """A weight as an fp32 tensor (a Coded one dequantized)."""
    return weight.dequantized() if isinstance(weight, Coded) else weight


def _rope(x, cos, sin):
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _fuse(*linears):
    """One weight (and bias) for several linear layers that read the same input; each layer's
    parameters become views of it, so the model keeps working and nothing is stored twice."""
    import torch

    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else weight.new_zeros(lin.out_features)
                          for b, lin in zip(biases, linears)])
    row = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight = torch.nn.Parameter(weight[row:row + rows], requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(bias[row:row + rows], requires_grad=False)
        row += rows
    return weight, bias


def _read_codes(path):
    """The codes saved by an earlier start, or None (absent, unreadable or from another format)."""
    import torch

    if path is None or not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a torn or old file: found again and rewritten
        return None


def _write_codes(path, codes: list[dict]) -> None:
    import os

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(codes, tmp)
    os.replace(tmp, path)
    for old in path.parent.glob(path.stem.rsplit("-", 1)[0] + "-*" + path.suffix):  # an older search's (~100s of MB)
        if old != path:
            old.unlink(missing_ok=True)
