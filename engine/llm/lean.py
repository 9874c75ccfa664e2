"""A dense Llama/Qwen2 checkpoint straight into the fast path, without transformers.

On a warm start of the cpu profile the language model was the last role ready, and
most of its load was importing transformers (~4 s of Python on a 2-core machine,
fighting the web UI's imports for the interpreter lock), not reading the 0.5 GB of
weights. A checkpoint this path can compute (engine/llm/fastpath.py: plain Llama or
Qwen2, default RoPE, safetensors, a `tokenizer.json`) is read here with `tokenizers` and
`jinja2` only: each tensor is read from the file straight into the fused layout the fast
path computes, and the embedding stays mapped from the file, so the rows no prompt
touches never fill memory.

transformers is still used for the rest: converting a GGUF (first start), other
architectures, MoE, omni, bitsandbytes, `llm.decode=transformers`, and the benches
that compare with its forward (`TransformersBackend.model`, built on first use).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from engine.llm.fastpath import LazyLayers, Rope, Weights, plain_config


def open_source(source, cache_dir: Path) -> "Checkpoint | None":
    """The lean checkpoint for a model source (engine/llm/sources.py): a plain Llama/Qwen2
    GGUF read from its blocks (only its tokenizer converted, once), another GGUF converted
    by transformers, or a local folder; None when transformers must load it."""
    from engine.llm.loading import converted_dir, gguf_tokenizer_dir

    if source.is_gguf:
        from engine.llm.gguf_blocks import GgufFile

        gguf = GgufFile.open(source.path)
        config = gguf.config() if gguf is not None else None
        if config is not None:
            return Checkpoint.open_gguf(gguf, gguf_tokenizer_dir(source, cache_dir, config))
        return Checkpoint.open(converted_dir(source, cache_dir))
    if source.path is not None and source.path.is_dir():
        return Checkpoint.open(source.path)
    return None


def codes_path(folder: Path) -> Path:
    """Where a checkpoint's int8 codes are kept, named for the code that makes and reads them
    (a change there finds them again)."""
    import hashlib

    here = Path(__file__).parent
    sources = (here / "kernels" / "q8.py", here / "fastpath.py", here / "gguf_blocks.py")
    version = hashlib.sha256(b"".join(f.read_bytes() for f in sources)).hexdigest()
    return folder / f"int8-codes-{version[:12]}.pt"


class Checkpoint:
    """A plain dense checkpoint folder: its config, generation config and tokenizer."""

    def __init__(self, folder: Path, config: dict, weight_files: list[Path], gguf=None) -> None:
        self.folder = Path(folder)
        self.files = _Files(weight_files)
        self.gguf = gguf  # engine/llm/gguf_blocks.py: the weights read from a GGUF's blocks
        self.config = SimpleNamespace(**config)
        generation = _read_json(self.folder / "generation_config.json") or {}
        self.generation_config = SimpleNamespace(**{"eos_token_id": None, "suppress_tokens": None, **generation})
        self.tokenizer = LeanTokenizer(self.folder)

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint | None":
        """The checkpoint at `folder`, or None when it is not one this path reads (the caller
        loads it through transformers)."""
        folder = Path(folder)
        config, weight_files = _read_json(folder / "config.json"), _weight_files(folder)
        if not config or not weight_files or not (folder / "tokenizer.json").exists():
            return None
        arch = (config.get("architectures") or [""])[0]
        if not plain_config(arch, SimpleNamespace(**config)) or _rope_theta(config) is None:
            return None
        try:
            return cls(folder, config, weight_files)
        except (NotLean, OSError, ValueError, KeyError):  # (transformers reports what is wrong)
            return None

    @classmethod
    def open_gguf(cls, gguf, folder: Path) -> "Checkpoint | None":
        """A GGUF read from its blocks (engine/llm/gguf_blocks.py), with the tokenizer and
        config.json converted into `folder`; None when `folder` lacks what this path reads."""
        config = _read_json(Path(folder) / "config.json")
        if not config or not (Path(folder) / "tokenizer.json").exists():
            return None
        try:
            return cls(folder, config, [], gguf)
        except (NotLean, OSError, ValueError, KeyError):
            return None

    def weights(self) -> Weights:
        """The tensors in the fast path's layout: each read from its file straight into place
        (q/k/v into one fused tensor, gate/up into another: nothing is held twice); the
        embedding mapped, so only the rows prompts use are ever read. From a GGUF: its codes."""
        if self.gguf is not None:
            from engine.llm.gguf_blocks import weights

            return weights(self.gguf, self.config)
        files, cfg = self.files, self.config
        embed = files.mapped("model.embed_tokens.weight")
        tied = getattr(cfg, "tie_word_embeddings", True) or not files.has("lm_head.weight")
        head = embed if tied else files.mapped("lm_head.weight")  # (int8: never read after its codes are found)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return Weights(cfg, embed, files.read(["model.norm.weight"]), head, Rope(head_dim, _rope_theta(vars(cfg))),
                       LazyLayers(lambda i: _read_layer(files, i), cfg.num_hidden_layers), shared=False)


def _read_layer(files: "_Files", i: int) -> dict:
    """Layer `i` of a safetensors checkpoint, each tensor read straight into the fused layout."""
    import torch

    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    qkv = [a + n + "_proj." for n in "qkv"]
    qkv_bias = None
    if any(files.has(n + "bias") for n in qkv):
        qkv_bias = torch.cat([files.read([n + "bias"]) if files.has(n + "bias")
                              else torch.zeros(files.shape(n + "weight")[0]) for n in qkv])
    return {"ln1": files.read([p + "input_layernorm.weight"]),
            "ln2": files.read([p + "post_attention_layernorm.weight"]),
            "qkv": files.read([n + "weight" for n in qkv]), "qkv_bias": qkv_bias,
            "o": files.read([a + "o_proj.weight"]), "o_bias": files.optional(a + "o_proj.bias"),
            "gate_up": files.read([m + "gate_proj.weight", m + "up_proj.weight"]),
            "down": files.read([m + "down_proj.weight"]), "down_bias": files.optional(m + "down_proj.bias")}


class NotLean(Exception):
    """The folder needs transformers after all (a tokenizer or template this file does not read)."""


class LeanTokenizer:
    """The part of a transformers tokenizer the backend uses, from `tokenizer.json` and the
    chat template, rendered the way transformers renders it (sandboxed jinja2, trimmed blocks)."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        conf = _read_json(self.folder / "tokenizer_config.json") or {}
        template_file = self.folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else conf.get("chat_template")
        if not isinstance(template, str) or "generation %}" in template:  # named templates, {% generation %}
            raise NotLean("chat template")
        if conf.get("clean_up_tokenization_spaces"):
            raise NotLean("clean_up_tokenization_spaces")
        self.special = {name: _content(conf.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.eos_token_id = self.convert_tokens_to_ids(self.special["eos_token"])
        self.unk_token_id = self.convert_tokens_to_ids(self.special["unk_token"])
        self.chat_template = template
        self._template = _environment().from_string(template)

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, tokenize: bool = True, add_generation_prompt: bool = False, **extra):
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special.items() if v is not None}, **extra)
        return self(text).input_ids if tokenize else text

    def hf(self):
        """transformers' tokenizer of the same folder (xgrammar reads its vocabulary from one)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))


def _environment():
    """jinja2 set up as transformers' apply_chat_template sets it up."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _rope_theta(config: dict) -> float | None:
    """The RoPE base when the rotary embedding is the default one (no scaling), else None."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        return None
    theta = params.get("rope_theta", config.get("rope_theta"))
    return float(theta) if theta else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    index = _read_json(folder / "model.safetensors.index.json")
    if not index:
        return []
    files = sorted({folder / name for name in index.get("weight_map", {}).values()})
    return files if files and all(f.exists() for f in files) else []


class _Files:
    """safetensors files read by hand (the format is an 8-byte length, a JSON header, the
    data), so that each tensor goes straight into the buffer it ends up in."""

    DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

    def __init__(self, paths: list[Path]) -> None:
        import struct

        self.where: dict[str, tuple] = {}
        for path in paths:
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    if info["dtype"] not in self.DTYPES or 8 + size + end > path.stat().st_size:
                        raise NotLean(f"{name}: {info['dtype']}, or {path.name} is truncated")
                    self.where[name] = (path, info["dtype"], tuple(info["shape"]), 8 + size + begin, end - begin)

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple:
        return self.where[name][2]

    def optional(self, name: str):
        return self.read([name]) if name in self.where else None

    def read(self, names: list[str]):
        """The tensors `names`, concatenated along the first dimension, in fp32."""
        import torch

        shapes = [self.where[n][2] for n in names]
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=torch.float32)
        row = 0
        for name, shape in zip(names, shapes):
            path, dtype, _, offset, nbytes = self.where[name]
            part = out[row:row + shape[0]]
            buf = part if dtype == "F32" else torch.empty(shape, dtype=getattr(torch, self.DTYPES[dtype]))
            with open(path, "rb") as f:
                f.seek(offset)
                if f.readinto(memoryview(buf.view(torch.uint8).numpy()).cast("B")) != nbytes:
                    raise OSError(f"{path.name} ended early")
            if buf is not part:
                part.copy_(buf)
            row += shape[0]
        return out

    def mapped(self, name: str):
        """An fp32 tensor mapped from its file (copy on write): pages are read when touched."""
        import numpy as np
        import torch

        path, dtype, shape, offset, _ = self.where[name]
        if dtype != "F32":
            return self.read([name])
        return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=shape))
