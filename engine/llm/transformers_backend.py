"""The main LLM backend: transformers, with our own token loop.

Our loop (prefill, then one forward per token on the KV cache) instead of
`model.generate` so that a CancelToken is checked before every step without
a thread, and so that later features (constrained decoding) can edit logits.
GGUF files are dequantized once by transformers and cached as safetensors
under the data directory, so the second start loads in well under a second.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from engine.config import LLMConfig
from engine.errors import Unavailable
from engine.events import CancelToken, RouterStats, TextDelta
from engine.llm.base import GenParams, LLMBackend, Message
from engine.llm.sources import ModelSource, resolve

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


class TransformersBackend(LLMBackend):
    def __init__(self, cfg: LLMConfig, cache_dir: Path) -> None:
        self.cfg = cfg
        if cfg.model in ("tiny", "tiny-moe"):
            from engine.llm.tiny import build_tiny_model, build_tiny_moe

            self.model, self.tokenizer = (build_tiny_moe if cfg.model == "tiny-moe" else build_tiny_model)(cfg.seed)
            self.name, model_ctx = f"{cfg.model}-random", self.model.config.max_position_embeddings
        else:
            source = resolve(cfg.model, cache_dir, cfg.sha256)
            self.model, self.tokenizer = _load(source, cfg, cache_dir)
            self.name = source.label
            model_ctx = source.context_tokens or getattr(self.model.config, "max_position_embeddings", None)
        self.context_tokens = min(cfg.context_tokens, model_ctx or cfg.context_tokens)
        from engine.moe.runtime import MoERuntime

        # MoE models: experts offloaded within --vram-gb, router statistics every turn
        self.moe = MoERuntime.attach(self.model, cfg, _device(cfg))
        self.device = next(self.model.parameters()).device
        self._kept: tuple[list[int], object] = ([], None)  # (token ids, KV cache) of the last turn
        self._reused = 0
        self.stop_ids = _stop_ids(self.model, self.tokenizer)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self._encode(messages))

    def _encode(self, messages: Sequence[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def generate(self, messages, media=(), params=GenParams(), cancel=None):
        import torch

        cancel = cancel or CancelToken()
        prompt = self._encode(messages)
        budget = self.context_tokens - len(prompt)
        if budget <= 0:
            raise ValueError(f"prompt is {len(prompt)} tokens; the context holds {self.context_tokens}")
        max_new = min(params.max_new_tokens, budget)
        sampler = _Sampler(params, self.device)
        detok = _Detokenizer(self.tokenizer)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "finish_reason": "length"}
        if cancel.cancelled:
            usage["finish_reason"] = "cancelled"
            return usage
        seen = list(prompt)  # every token now in the KV cache, for the next turn's prefix reuse
        if self.moe is not None:
            self.moe.begin_turn()
        with torch.inference_mode():
            out = self._prefill(prompt)
            for step in range(max_new):
                token = sampler(out.logits[:, -1, :])
                seen.append(token)
                if token in self.stop_ids:
                    usage["finish_reason"] = "stop"
                    break
                usage["completion_tokens"] = step + 1
                if text := detok.push(token):
                    yield TextDelta(text)
                if cancel.cancelled:
                    usage["finish_reason"] = "cancelled"
                    break
                if step + 1 == max_new:
                    break
                nxt = torch.tensor([[token]], device=self.device)
                out = self.model(input_ids=nxt, cache=out.cache, use_cache=True)
            self._kept = (seen[: out.cache.get_seq_length()], out.cache)
        if text := detok.flush():
            yield TextDelta(text)
        if self.moe is not None:
            yield RouterStats(self.moe.summary())
        usage["cached_prompt_tokens"] = self._reused
        return usage

    def forget(self) -> None:
        """Drop the kept KV cache (benchmarks measure a cold prompt)."""
        self._kept = ([], None)

    def _prefill(self, prompt: list[int]):
        """Run the prompt, reusing the KV cache of the previous turn for the part of
        the prompt it already holds (the conversation so far), so a multi-turn chat
        only pays for the new message."""
        import torch

        kept_ids, cache = self._kept
        self._kept, self._reused = ([], None), 0
        common = 0
        for a, b in zip(kept_ids, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # at least one token must run to get logits
        if cache is None or common < 16:
            cache = None
        else:
            if cache.get_seq_length() > common:
                cache.crop(common - cache.get_seq_length())  # this API takes how many to drop
            self._reused = common
        ids = torch.tensor([prompt[self._reused:]], device=self.device)
        return self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

    def close(self) -> None:
        self.model = None
        _empty_cuda_cache()

    def plain_generate(self, messages, max_new_tokens: int):
        """transformers' own `generate` (greedy) on the same weights: for bench/text.py."""
        import torch

        ids = torch.tensor([self._encode(messages)], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()


class _Sampler:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling, seeded per turn."""

    def __init__(self, params: GenParams, device) -> None:
        import torch

        self.t, self.top_p = params.temperature, params.top_p
        self.gen = torch.Generator(device=device).manual_seed(params.seed) if self.t > 0 else None

    def __call__(self, logits) -> int:
        import torch

        if self.gen is None:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits.float() / self.t, dim=-1)[0]
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))


class _Detokenizer:
    """Incremental decoding that never splits a multi-byte character or a
    word-initial space (the prefix/read offsets used by TGI and vLLM)."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def _device(cfg: LLMConfig) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("llm.device is cuda but no CUDA GPU is visible", "use --device cpu or the cpu profile")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _load_kwargs(cfg: LLMConfig, device: str) -> dict:
    import torch

    kwargs: dict = {"dtype": torch.float16 if device == "cuda" else torch.float32}
    if cfg.quantization != "none":
        if device != "cuda":
            raise Unavailable(f"{cfg.quantization} quantization needs a CUDA GPU", "set --quantization none")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Unavailable("bitsandbytes is not installed", "pip install '.[gpu]'") from None
        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = "cuda"
    return kwargs


def _load(source: ModelSource, cfg: LLMConfig, cache_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the UI and the CLI show their own state
    hf_logging.set_verbosity_error()

    device = _device(cfg)
    kwargs = _load_kwargs(cfg, device)
    where = source.path
    try:
        if source.is_gguf:
            where = _converted(source, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        model = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
    except (OSError, ValueError) as exc:
        hint = ("download it first and point --llm at the local directory"
                if source.hub else "check the files at " + str(source.path))
        raise Unavailable(f"could not load {source.label}: {str(exc).splitlines()[0][:200]}", hint) from exc
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def _converted(source: ModelSource, cache_dir: Path) -> Path:
    """Dequantize a GGUF once and keep it as safetensors; return the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / f"{source.path.stem}-{source.cache_key[:16]}"
    if (target / "READY").exists():
        return target
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


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
