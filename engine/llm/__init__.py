"""LLM backends behind one contract (engine/llm/base.py), one file each."""
from __future__ import annotations

from pathlib import Path

from engine.config import LLMConfig
from engine.llm.base import LLMBackend


def load_backend(cfg: LLMConfig, cache_dir: Path) -> LLMBackend:
    """Build the configured backend; raises engine.errors.Unavailable with what to set."""
    if cfg.backend == "transformers":
        from engine.llm.transformers_backend import TransformersBackend as cls
    elif cfg.backend == "openai":
        from engine.llm.openai_backend import OpenAIBackend as cls
    elif cfg.backend == "llamacpp":
        from engine.llm.llamacpp_backend import LlamaCppBackend as cls
    else:
        raise ValueError(f"unknown llm backend {cfg.backend!r}")
    return cls(cfg, cache_dir)
