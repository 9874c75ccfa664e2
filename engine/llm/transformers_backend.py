"""The main LLM backend: transformers weights, with our own token loop.

Our loop (prefill, then one forward per token on the KV cache) instead of
`model.generate` so that a CancelToken is checked before every step without a
thread. Dense Llama/Qwen2 models decode on engine/llm/fastpath.py (int8/4-bit
weights with a C kernel on the CPU); the rest on transformers' forward.
Constrained decoding (engine/llm/structured.py) steps through `steps()`.
Loading (GGUF conversion, bitsandbytes, omni checkpoints, tiny models) is in
engine/llm/loading.py, a checkpoint read without transformers in engine/llm/lean.py,
sampling and detokenizing in engine/llm/decoding.py.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from engine.config import LLMConfig
from engine.errors import Unavailable
from engine.events import CancelToken, RouterStats
from engine.llm.base import GenParams, LLMBackend, Message
from engine.llm.conversion import Unconverted, cached_only, convert_in_child, converting
from engine.llm.decoding import Sampler, TokenText, stop_ids
from engine.llm.loading import device_of, load_model, load_tiny, max_positions, text_config
from engine.llm.sources import resolve
from engine.llm.stepping import Steps, crop
from engine.llm.tool_calls import as_facts

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
MAX_KV_POSITIONS = 32768
FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")  # fill in the middle (Qwen2.5-Coder's tokens)


class TransformersBackend(LLMBackend):
    constrained = True  # local logits: choices scored, JSON decoded under a grammar

    def __init__(self, cfg: LLMConfig, cache_dir: Path, convert_here: bool = False) -> None:
        """A first start's one-time conversions (the GGUF joined, its tokenizer converted, the
        int8 codes found) run in a child process (engine/llm/conversion.py), unless
        `convert_here` (that child's own load); this process then loads what the child wrote,
        as a warm start does."""
        try:
            with cached_only(not convert_here):
                self._load(cfg, cache_dir)
        except Unconverted:
            convert_in_child(cfg, cache_dir)
            self._load(cfg, cache_dir)

    def _load(self, cfg: LLMConfig, cache_dir: Path) -> None:
        from engine.llm.omni import OmniInputs
        from engine.llm.tiny_omni import NAMES as TINY_OMNI

        self.cfg, self.cache_dir = cfg, Path(cache_dir)
        self.lean, self._model, proc, self.talker_model = None, None, None, None
        if cfg.model in ("tiny", "tiny-moe", *TINY_OMNI):
            self._model, self.tokenizer, proc, self.talker_model = load_tiny(cfg)
            self.name, model_ctx = f"{cfg.model}-random", max_positions(self._model.config)
        else:
            source = self.source = resolve(cfg.model, cache_dir, cfg.sha256)
            self.lean = self._open_lean(source)  # (no transformers import on this path)
            if self.lean is not None:
                self.tokenizer, model_ctx = self.lean.tokenizer, max_positions(self.lean.config)
            else:
                self._model, self.tokenizer, proc, self.talker_model = load_model(source, cfg, cache_dir)
                model_ctx = max_positions(self._model.config)
            self.name = source.label
            model_ctx = source.context_tokens or model_ctx
        self.context_tokens = min(cfg.context_tokens, model_ctx or cfg.context_tokens)
        # the fast path's KV cache: room for all the model can attend to (pages are only touched
        # as they fill); the conversation itself is held to context_tokens by generate()
        self.kv_capacity = max(self.context_tokens, min(model_ctx or 0, MAX_KV_POSITIONS))
        # an omni backbone (Qwen2.5-Omni, Qwen3-Omni, Qwen2.5-VL): images and video go in through its processor
        self.omni = OmniInputs(self._model, proc) if proc is not None else None
        self.media_kinds = self.omni.kinds if self.omni else frozenset()
        # MoE models: experts offloaded within --vram-gb, router statistics every turn
        self.moe = None
        if self.lean is None:
            from engine.moe.runtime import MoERuntime

            self.moe = MoERuntime.attach(self._model, cfg, device_of(cfg))
        self.device = _input_device(self._model) if self.lean is None else _cpu()
        self._kept: tuple[list[int], object] = ([], None)  # (token ids, KV cache) of the last turn
        self._reused = 0
        meta = self.lean or self._model  # (both carry .config and .generation_config)
        self.vocab_size = text_config(meta.config).vocab_size
        self.stop_ids = stop_ids(meta, self.tokenizer)
        self.suppress = list(getattr(meta.generation_config, "suppress_tokens", None) or [])
        self.parked = False  # weights moved to CPU memory for a diffusion pipeline (park / ready)
        self.fast = self._attach_fast()
        self.scheduler = self._serve()
        self.grammar_compiler = None  # xgrammar's, built on the first json_call (structured.py)

    def _attach_fast(self):
        """The lean decode path (engine/llm/fastpath.py) for plain dense Llama/Qwen2 models;
        None for the rest (MoE, omni, bitsandbytes), which keep transformers' forward."""
        from engine.llm.fastpath import FastLM
        from engine.llm.kernels import q8

        mode = self.cfg.decode
        if mode not in ("int8", "fp32", "transformers"):
            raise Unavailable(f"llm.decode is {mode!r}", "choose int8, fp32 or transformers")
        if mode == "transformers" or self.moe is not None or self.omni is not None or self.talker_model:
            return None
        lib = q8.load(self.cache_dir / "kernels") if mode == "int8" else None
        how = {"slots": self.cfg.max_parallel, "x8": q8.ACTIVATIONS[self.cfg.activations], "compact": self.cfg.compact_codes}
        codes = self._codes_path()
        if lib is not None and codes is not None and not codes.exists():
            converting("the int8 codes")
        if self.lean is not None:
            return FastLM(self.lean.weights(), self.kv_capacity, int8=lib, codes_path=codes, **how)
        return FastLM.attach(self._model, self.kv_capacity, int8=lib, codes_path=codes, **how)

    def _serve(self):
        """The scheduler that owns the fast path (engine/llm/scheduler.py): every use of the model
        is a sequence in its batch. None without a fast path (one sequence at a time, behind
        the engine's lock)."""
        if self.fast is None:
            return None
        from engine.llm.scheduler import Scheduler

        return Scheduler(self.fast, max_waiting=self._max_waiting, prefill_chunk=self.cfg.prefill_chunk)

    _max_waiting = 16

    @property
    def schedules(self) -> bool:
        return self.scheduler is not None

    @property
    def parallel(self) -> int:
        return self.scheduler.capacity if self.scheduler is not None else 1

    def limit_queue(self, max_waiting: int) -> None:
        self._max_waiting = max_waiting
        if self.scheduler is not None:
            self.scheduler.max_waiting = max_waiting

    def _open_lean(self, source):
        """The checkpoint read without transformers (engine/llm/lean.py), when the fast path
        computes all of it: a plain dense model decoded on the CPU, no talker, no bitsandbytes."""
        import engine.llm.lean as lean

        cfg = self.cfg
        if cfg.decode not in ("int8", "fp32") or cfg.talker or cfg.quantization != "none" or device_of(cfg) != "cpu":
            return None
        return lean.open_source(source, self.cache_dir)

    @property
    def model(self):
        """transformers' model of these weights. A lean load (engine/llm/lean.py) never needs
        it to answer; it is built on first use (the benches compare with its forward)."""
        if self._model is None and self.lean is not None:
            self._model = load_model(self.source, self.cfg, self.cache_dir)[0]
        return self._model

    def _codes_path(self):
        """Where the int8 codes of a converted model are kept (none for tiny test models)."""
        from engine.llm.lean import codes_path

        where = str(self.lean.folder) if self.lean is not None else getattr(self._model.config, "_name_or_path", "")
        return codes_path(Path(where)) if where and Path(where).is_dir() else None

    @property
    def decode_path(self) -> str:
        """How decode steps run, for the status panel and the benches."""
        if self.fast is None:
            return "transformers forward"
        if self.fast.int8 is not None:
            return "fast path, int8 weights (C kernel)"
        from engine.llm.kernels import q8

        return "fast path, fp32" + (f" ({q8.reason()})" if self.cfg.decode == "int8" and q8.reason() else "")

    # ---- sharing the GPU with the diffusion generators -------------------------------------
    def park(self, force: bool = False) -> int:
        """Make GPU room for a diffusion pipeline; returns the bytes freed. Offloaded MoE experts
        leave the cache (they come back on demand); otherwise the weights move to CPU memory
        and come back before the next forward (`ready()`). A CPU model has nothing to give
        (`force` runs the same steps anyway, for tests). 8-bit layers cannot move and stay."""
        if self.moe is not None and self.moe.cache is not None:
            freed = self.moe.cache.used
            self.moe.cache.clear()
            _empty_cuda_cache()
            return freed
        if self.parked or self.lean is not None or (self.device.type != "cuda" and not force):
            return 0  # (a lean load is on the CPU: nothing to give)
        if self.scheduler is not None and self.scheduler.locked():
            return 0  # (answers are being decoded: they keep the model)
        whole = self.talker_model or self.model  # (with a talker: thinker, talker and vocoder)
        try:
            whole.to("cpu")
        except ValueError:  # transformers refuses to move 8-bit bitsandbytes models
            return 0
        self._kept, self.parked, self.fast = ([], None), True, None  # (its fused weights stay behind)
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        _empty_cuda_cache()
        return whole.get_memory_footprint()

    def ready(self) -> None:
        """Before any forward: weights back on the device after `park`, and (omni models) the
        multimodal rotary offsets of the last media prompt forgotten."""
        if self.parked:
            (self.talker_model or self.model).to(self.device)
            self.parked = False
            self.fast = self._attach_fast()  # fused again, on the device
            self.scheduler = self._serve()
        if self.omni is not None:
            from engine.llm.omni import reset_positions

            reset_positions(self.model)

    def steps(self, prompt: list[int]) -> Steps:
        """The prompt run, then one token at a time (`push`), each giving the next logits: for
        constrained decoding, on the fast path when the model has one. The kept cache is dropped."""
        self.ready()
        self._kept = ([], None)
        return Steps(self, prompt)

    def choose(self, messages, options):
        from engine.llm.structured import choose

        return choose(self, messages, options)

    def json_call(self, messages, schema, cancel=None, max_new_tokens: int = 256):
        from engine.llm.structured import json_call

        return json_call(self, messages, schema, cancel, max_new_tokens)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.encode(messages))

    def encode(self, messages: Sequence[Message] | str, opened: bool = True, tools: Sequence[dict] = ()) -> list[int]:
        """The prompt's token ids: the chat template, with the assistant's turn opened (or not:
        a prefix every later prompt starts with, `prime`), and the function tools the model may
        call (tool_calls.py). A string is a raw prompt (OpenAI's /v1/completions): no template."""
        from engine.llm.tool_calls import native, template_messages

        if isinstance(messages, str):
            return self.tokenizer(messages, add_special_tokens=False).input_ids
        own = native(self.tokenizer)
        extra = {"tools": list(tools)} if tools and own else {}
        text = self.tokenizer.apply_chat_template(template_messages(messages, tools, own), tokenize=False,
                                                  add_generation_prompt=opened, **extra)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def features(self) -> frozenset:
        fim = all(self.tokenizer.convert_tokens_to_ids(t) not in (None, self.tokenizer.unk_token_id) for t in FIM)
        return frozenset({"tools", "response_format", "logprobs", "penalties", "logit_bias", "raw_prompt",
                          *(("fim",) if fim else ())})

    def generate(self, messages, media=(), params=GenParams(), cancel=None):
        import torch

        cancel = cancel or CancelToken()
        media = [m for m in media if getattr(m, "kind", None) in self.media_kinds]
        inputs, masks, seen_files = self.omni.build(messages, media) if media else (None, {}, [])
        tools = params.tools if params.tool_choice != "none" else ()
        if not tools and not isinstance(messages, str):  # (an answer reads earlier calls and results as notes)
            messages = as_facts(messages)
        prompt = inputs["input_ids"][0].tolist() if inputs else self.encode(messages, tools=tools)
        budget = self.context_tokens - len(prompt)
        if budget <= 0:
            media_note = f" ({sum(int(m.sum()) for m in masks.values())} of them for the media)" if masks else ""
            raise ValueError(f"prompt is {len(prompt)} tokens{media_note}; the context holds {self.context_tokens}")
        max_new = min(params.max_new_tokens, budget)
        if tools:  # the model calls a tool, or answers with its opener suppressed
            from engine.llm.tool_calls import OPEN, opener, tool_turn

            called = yield from tool_turn(self, messages, prompt, replace(params, max_new_tokens=max_new), cancel)
            if called is not None:
                return called
            # the model answers: without the tools' block, and with calls and results as notes of what
            # was found (tool_calls.as_facts): in its tool format a small model writes calls as text
            prompt = self.encode(as_facts(messages))
            max_new = min(params.max_new_tokens, self.context_tokens - len(prompt))
            first = opener(self.tokenizer)
            if self.tokenizer.decode([first]) == OPEN.strip():  # (a token of its own, as Qwen's: never a stray "<")
                params = replace(params, logit_bias=(*params.logit_bias, (first, -1e4)))
        grammar = None
        if params.response_format is not None:  # JSON, under the grammar of its schema
            from engine.llm.structured import Grammar

            grammar = Grammar(self, params.response_format.get("schema"), max_new)
        sampler = Sampler(params, self.device, self.suppress, prompt, grammar)
        detok = TokenText(self.tokenizer, sampler)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "finish_reason": "length"}
        if masks:
            usage["media_tokens"] = {kind: int(m.sum()) for kind, m in masks.items()}
            usage["media_seen"] = seen_files
        if cancel.cancelled:
            usage["finish_reason"] = "cancelled"
            return usage
        seen = list(prompt)  # every token now in the KV cache, for the next turn's prefix reuse
        if self.moe is not None:
            self.moe.begin_turn()
        self.ready()
        trace = self._trace(params, inputs, prompt)  # for the talker: the thinker's hidden states
        if trace is not None:
            self._kept = ([], None)  # the talker needs the whole prompt's states: no prefix reuse
        if inputs is None and trace is None and self.scheduler is not None:
            return (yield from self._generate_scheduled(prompt, sampler, max_new, cancel, params, usage, detok))
        with torch.inference_mode():
            out = self._prefill_media(inputs, masks, trace) if inputs else self._prefill(prompt, trace)
            logits = out.logits[:, -1, :]
            for step in range(max_new):
                token = sampler(logits)
                seen.append(token)
                if trace is not None:
                    trace.reply_ids.append(token)
                if token in self.stop_ids:
                    usage["finish_reason"] = "stop"
                    break
                usage["completion_tokens"] = step + 1
                if delta := detok.push(token):
                    yield delta
                if cancel.cancelled:
                    usage["finish_reason"] = "cancelled"
                    break
                if step + 1 == max_new:
                    break
                nxt = torch.tensor([[token]], device=self.device)
                out = self._forward(trace, input_ids=nxt, cache=out.cache, use_cache=True)
                logits = out.logits[:, -1, :]
            self._kept = (seen[:out.cache.get_seq_length()], out.cache)
        if delta := detok.flush():
            yield delta
        if self.moe is not None:
            yield RouterStats(self.moe.summary())
        usage["cached_prompt_tokens"] = self._reused
        return usage

    def _generate_scheduled(self, prompt, sampler, max_new, cancel, params, usage, detok):
        """The answer as a sequence of the scheduler's batch: it samples and stops; this streams."""
        seq = self.scheduler.submit(prompt, sampler, max_new, self.stop_ids, cancel, params.priority)
        taken, finish = 0, None
        try:
            for token in seq.tokens():
                taken += 1
                if delta := detok.push(token):
                    yield delta
                if cancel.cancelled:  # (the loop may be a few tokens ahead: those are dropped)
                    finish = "cancelled"
                    break
        finally:
            seq.close()  # (a consumer gone mid-answer: its slot is free at the next step)
        if delta := detok.flush():
            yield delta
        usage.update(completion_tokens=taken, finish_reason=finish or seq.finish, cached_prompt_tokens=seq.reused)
        return usage

    def prime(self, messages) -> int:
        if self.scheduler is None:  # (transformers' own cache is built per answer)
            return 0
        ids = self.encode(messages, opened=False)
        if len(ids) >= self.context_tokens:
            return 0
        seq = self.scheduler.open(ids)
        try:
            seq.logits()
        finally:
            seq.close()  # the slot keeps the prompt's cache; every new chat copies it
        return len(ids)

    def forget(self) -> None:
        """Drop the kept KV caches (benchmarks measure a cold prompt)."""
        self._kept = ([], None)
        if self.scheduler is not None:
            self.scheduler.forget()

    def _trace(self, params: GenParams, inputs, prompt):
        if params.trace is None or self.talker_model is None:
            return None
        import torch

        from engine.speech.talker import ThinkerTrace

        trace = ThinkerTrace.from_inputs(inputs) if inputs else ThinkerTrace(torch.tensor([prompt]))
        params.trace.append(trace)
        return trace

    def _forward(self, trace, **kwargs):
        """One forward of the model; with a talker trace, its hidden states are recorded."""
        out = self.model(**kwargs, output_hidden_states=trace is not None)
        if trace is not None:
            trace.add(out.hidden_states)
        return out

    def _prefill_media(self, inputs: dict, masks: dict, trace=None):
        """The whole prompt with its images or video, through the model's vision tower;
        MoE router statistics split by the modality of each token."""
        self._kept, self._reused = ([], None), 0
        import torch

        if self.moe is not None:
            text = ~torch.stack(list(masks.values())).any(dim=0)
            self.moe.stats.set_modalities({"text": text, **masks})
        try:
            return self._forward(trace, **{k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()},
                                 use_cache=True, logits_to_keep=1)
        finally:
            if self.moe is not None:
                self.moe.stats.set_modalities(None)

    def _reusable(self, prompt: list[int]):
        """(the kept KV cache, how many leading prompt tokens it already holds) — the
        conversation so far, so a multi-turn chat only pays for the new message (the fast
        path's slots keep theirs in the scheduler)."""
        kept_ids, cache = self._kept
        self._kept, self._reused = ([], None), 0
        if cache is None:
            return None, 0
        common = 0
        for a, b in zip(kept_ids, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # at least one token must run to get logits
        if common < 16:
            return None, 0
        self._reused = common
        return cache, common

    def _prefill(self, prompt: list[int], trace=None):
        """Run the prompt through transformers' forward, reusing the kept KV cache."""
        import torch

        cache, common = self._reusable(prompt)
        if cache is not None:
            crop(cache, common)
        ids = torch.tensor([prompt[common:]], device=self.device)
        return self._forward(trace, input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self._model = self.fast = self.lean = self.scheduler = None
        _empty_cuda_cache()

    def plain_generate(self, messages, max_new_tokens: int):
        """transformers' own `generate` (greedy) on the same weights: for bench/text.py."""
        import torch

        ids = torch.tensor([self.encode(messages)], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()


def _cpu():
    import torch

    return torch.device("cpu")


def _input_device(model):
    """Where input ids go: the embedding's device."""
    return model.get_input_embeddings().weight.device


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
