"""Any OpenAI-compatible server (vLLM, vLLM-Omni, llama.cpp server, this app).

The `remote` profile. Streams with SSE through the official `openai` client;
cancel closes the HTTP stream so the server stops decoding too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from engine.config import LLMConfig
from engine.errors import Unavailable
from engine.events import CancelToken, TextDelta
from engine.llm.base import GenParams, LLMBackend, Message, answer_seed


class OpenAIBackend(LLMBackend):
    def __init__(self, cfg: LLMConfig, cache_dir: Path | None = None) -> None:
        try:
            import openai
        except ImportError:
            raise Unavailable("the openai package is not installed", "pip install openai") from None
        self.cfg = cfg
        self._errors = (openai.APIConnectionError, openai.APIStatusError)
        self.client = openai.OpenAI(base_url=cfg.base_url,
                                    api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=60.0, max_retries=0)
        self.model = cfg.model
        if cfg.model in ("", "default"):
            self.model = self._first_model()
        self.name = f"{self.model} @ {cfg.base_url}"
        self.context_tokens = cfg.context_tokens

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except self._errors as exc:
            raise Unavailable(f"no OpenAI-compatible server answers at {self.cfg.base_url} ({exc})",
                              "start the server or set --api-base") from None
        if not models:
            raise Unavailable(f"the server at {self.cfg.base_url} lists no models", "set --llm to a model name")
        return models[0].id

    def count_tokens(self, messages: Sequence[Message]) -> int:
        # the remote tokenizer is unknown; ~4 characters a token, plus the template
        return sum(len(m["content"]) // 4 + 4 for m in messages) + 2

    def generate(self, messages, media=(), params=GenParams(), cancel=None):
        cancel = cancel or CancelToken()
        usage = {"prompt_tokens": self.count_tokens(messages), "completion_tokens": 0, "finish_reason": "length"}
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=list(messages), stream=True,
                max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_p=params.top_p, seed=answer_seed(params.seed, repr(list(messages)).encode()),
                stream_options={"include_usage": True},
            )
        except self._errors as exc:
            raise RuntimeError(f"the LLM server at {self.cfg.base_url} failed: {exc}") from exc
        with stream:
            for chunk in stream:
                if chunk.usage:
                    usage["prompt_tokens"] = chunk.usage.prompt_tokens
                    usage["completion_tokens"] = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        if not chunk.usage:
                            usage["completion_tokens"] += 1
                        yield TextDelta(choice.delta.content)
                    if choice.finish_reason:
                        usage["finish_reason"] = choice.finish_reason
                if cancel.cancelled:
                    usage["finish_reason"] = "cancelled"
                    break  # leaving `with` closes the connection; the server stops
        return usage

    def close(self) -> None:
        self.client.close()
