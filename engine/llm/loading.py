"""Loading the transformers backend's model: a manifest file, a local dir, a .gguf or a
cached hub id; bitsandbytes 4/8-bit; omni checkpoints (thinker + processor, and the
talker when asked); tiny seeded models for tests through the same path.

A plain dense Llama/Qwen2 GGUF is read by the fast path straight from its blocks
(engine/llm/gguf_blocks.py); only its tokenizer is converted, once (`gguf_tokenizer_dir`).
Other GGUF files are dequantized once by transformers and cached as safetensors under the
data directory, so the second start loads in well under a second.

A first start's conversions run in a child process (engine/llm/conversion.py).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from engine.config import LLMConfig
from engine.errors import Unavailable
from engine.llm.conversion import converting
from engine.llm.sources import ModelSource


def device_of(cfg: LLMConfig) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("llm.device is cuda but no CUDA GPU is visible", "use --device cpu or the cpu profile")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _load_kwargs(cfg: LLMConfig, device: str, moe: bool) -> dict:
    """from_pretrained arguments. bitsandbytes quantizes the linear layers (on CUDA, or with
    its CPU backend); MoE models load on the CPU first: bitsandbytes leaves fused expert
    tensors as they are, so engine/moe quantizes those to NF4 and places them (on the GPU,
    or offloaded within --vram-gb) without full-precision experts ever filling the GPU."""
    import torch

    kwargs: dict = {"dtype": torch.float16 if device == "cuda" else torch.float32}
    if cfg.quantization != "none":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Unavailable("bitsandbytes is not installed", "make install (or pip install bitsandbytes)") from None
        skip = ["lm_head", "experts"] if moe else None  # our NF4 experts; bnb would split per-expert linears
        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"],
                llm_int8_skip_modules=skip)
        else:
            if moe:
                raise Unavailable("8-bit bitsandbytes layers cannot be moved by the expert cache",
                                  "use --quantization 4bit for MoE models (4-bit layers, NF4 experts)")
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": "cpu" if moe else device}
    return kwargs


def load_model(source: ModelSource, cfg: LLMConfig, cache_dir: Path):
    """(model, tokenizer, processor or None) from a manifest file, local dir, .gguf or cached hub id."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import engine.llm.omni as omni

    _quiet()
    device = device_of(cfg)
    where = source.path
    try:
        if source.is_gguf:
            where = converted_dir(source, cache_dir)
        config = omni.read_config(where, source.hub)
        model_type, moe = config.get("model_type", ""), omni.is_moe_config(config)
        kwargs = _load_kwargs(cfg, device, moe)
        talker = None
        if omni.is_omni(model_type):
            model, proc = omni.load_omni(str(where), model_type, kwargs, talker=cfg.talker)
            tokenizer = proc.tokenizer
            if omni.has_talker(model):  # the whole Qwen2.5-Omni: our loop runs its thinker
                model, talker = model.thinker, model
        else:
            tokenizer, proc = AutoTokenizer.from_pretrained(str(where)), None
            model = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # a missing, torn or foreign file
        hint = ("download it first and point --llm at the local directory"
                if source.hub else "check the files at " + str(source.path))
        raise Unavailable(f"could not load {source.label}: {str(exc).splitlines()[0][:200]}", hint) from exc
    if "device_map" not in kwargs and not moe:
        model = model.to(device)  # (MoE models are placed by engine/moe once their experts are ready)
        if talker is not None:
            talker.to(device)
    return model.eval(), tokenizer, proc, talker


def load_tiny(cfg: LLMConfig):
    """A seeded random model of `cfg.model` (tests); quantized through the real load path."""
    import tempfile

    from engine.llm.tiny import build_tiny_model, build_tiny_moe
    from engine.llm.tiny_omni import NAMES, build_tiny_vlm

    proc = talker = None
    if cfg.model == "tiny-omni" and cfg.talker:
        from engine.speech.talker import build_tiny_omni

        talker, proc = build_tiny_omni(cfg.seed)  # thinker + talker + token2wav
        model, tokenizer = talker.thinker, proc.tokenizer
        if cfg.quantization != "none":
            raise Unavailable("the tiny talker model is not quantized", "set --quantization none")
    elif cfg.model in NAMES:
        model, proc = build_tiny_vlm(cfg.seed, NAMES[cfg.model])
        tokenizer = proc.tokenizer
    else:
        model, tokenizer = (build_tiny_moe if cfg.model == "tiny-moe" else build_tiny_model)(cfg.seed)
    moe = cfg.model.endswith("moe")
    if cfg.quantization != "none":
        import engine.llm.omni as omni

        _quiet()
        with tempfile.TemporaryDirectory() as d:  # weights on disk -> bitsandbytes, as a real checkpoint
            model.save_pretrained(d)
            kwargs = _load_kwargs(cfg, device_of(cfg), moe)
            if proc is not None:
                quantized = omni.load_omni(d, model.config.model_type, kwargs, proc)[0]
            else:
                from transformers import AutoModelForCausalLM

                quantized = AutoModelForCausalLM.from_pretrained(d, **kwargs)
            quantized.generation_config = model.generation_config
            model = quantized
    elif not moe:
        (talker or model).to(device_of(cfg))  # (the talker holds the thinker: both move)
    return model.eval(), tokenizer, proc, talker


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the UI and the CLI show their own state
    hf_logging.set_verbosity_error()


def text_config(config):
    """The language model's part of a config (an omni / vision-language model nests it)."""
    return getattr(config, "text_config", None) or config


def max_positions(config) -> int | None:
    return getattr(text_config(config), "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)


def converted_dir(source: ModelSource, cache_dir: Path) -> Path:
    """Dequantize a GGUF once and keep it as safetensors; return the directory."""
    target = cache_dir / f"{source.path.stem}-{source.cache_key[:16]}"
    if (target / "READY").exists():
        return target
    converting("the model converted by transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, name = str(source.path.parent), source.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the dequantized weights are plain tensors; drop the GGUF marker so they save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "READY").write_text(f"converted from {source.path} in {time.monotonic() - started:.1f}s\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def gguf_tokenizer_dir(source: ModelSource, cache_dir: Path, config: dict) -> Path:
    """The folder a GGUF read from its blocks keeps beside it: its tokenizer converted once by
    transformers (tokenizer.json, the chat template), config.json from the file's keys."""
    import json

    target = cache_dir / f"{source.path.stem}-{source.cache_key[:16]}.tokenizer"
    if (target / "READY").exists():
        return target
    converting("the tokenizer converted from the GGUF")
    from transformers import AutoTokenizer

    _quiet()
    started = time.monotonic()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name).save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (tmp / "READY").write_text(f"tokenizer of {source.path} in {time.monotonic() - started:.1f}s\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
