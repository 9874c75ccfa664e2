"""Optional fast CPU text path: llama.cpp through llama-cpp-python on a GGUF.

Not in the default install (it compiles for ~10 minutes): `pip install
'.[llamacpp]'`, then `--llm-backend llamacpp`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from engine.config import LLMConfig
from engine.errors import Unavailable
from engine.events import CancelToken, TextDelta
from engine.llm.base import GenParams, LLMBackend, Message, answer_seed
from engine.llm.sources import resolve


class LlamaCppBackend(LLMBackend):
    def __init__(self, cfg: LLMConfig, cache_dir: Path) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise Unavailable("llama-cpp-python is not installed", "pip install '.[llamacpp]' (compiles ~10 min)") from None
        source = resolve(cfg.model, cache_dir, cfg.sha256)
        if not source.is_gguf:
            raise Unavailable(f"{source.label} is not a GGUF file", "llama.cpp needs --llm pointing at a .gguf")
        self.context_tokens = min(cfg.context_tokens, source.context_tokens or cfg.context_tokens)
        self.llm = Llama(model_path=str(source.path), n_ctx=self.context_tokens, seed=cfg.seed, verbose=False)
        self.name = f"{source.label} (llama.cpp)"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return len(self.llm.tokenize(text.encode(), special=True)) + 3

    def generate(self, messages, media=(), params=GenParams(), cancel=None):
        cancel = cancel or CancelToken()
        usage = {"prompt_tokens": self.count_tokens(messages), "completion_tokens": 0, "finish_reason": "length"}
        stream = self.llm.create_chat_completion(
            messages=list(messages), stream=True, max_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p,
            seed=answer_seed(params.seed, repr(list(messages)).encode()))
        for chunk in stream:
            choice = chunk["choices"][0]
            if text := choice["delta"].get("content"):
                usage["completion_tokens"] += 1
                yield TextDelta(text)
            if choice.get("finish_reason"):
                usage["finish_reason"] = choice["finish_reason"]
            if cancel.cancelled:
                usage["finish_reason"] = "cancelled"
                stream.close()
                break
        return usage
