"""The one contract every LLM backend implements.

`generate(messages, media, params, cancel)` is a generator of TextDelta (and,
later, ToolCall) events. It checks `cancel` before every decoding step and
returns (StopIteration.value) a usage dict:
`{"prompt_tokens", "completion_tokens", "finish_reason"}` where
finish_reason is "stop", "length" or "cancelled".
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Generator, Sequence

from engine.events import CancelToken, TextDelta, ToolCall

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    #: mixed with the prompt (`answer_seed`): the same seed and prompt give the same answer
    seed: int = 0
    #: a list the backend appends the thinker's trace to (hidden states for an omni talker)
    trace: list | None = field(default=None, compare=False)


def answer_seed(seed: int, prompt: bytes) -> int:
    """The sampling seed of one answer: `seed` mixed with its prompt. The configured seed is
    the same for every turn; used as is, every answer takes the same random draws, so a
    small model's answer to one question comes out again, word for word, as the next
    one's. Mixed, a prompt still gives the same answer for the same seed (reproducible),
    and the next turn draws afresh."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + prompt, digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31  # (llama.cpp takes a 32-bit seed)


class LLMBackend(ABC):
    #: shown in the status panel and /v1/models
    name: str = ""
    #: the model's context window in tokens (prompt + answer)
    context_tokens: int = 2048

    @abstractmethod
    def generate(
        self,
        messages: Sequence[Message],
        media: Sequence = (),
        params: GenParams = GenParams(),
        cancel: CancelToken | None = None,
    ) -> Generator[TextDelta | ToolCall, None, dict]:
        """Stream the assistant's answer to `messages`."""

    @abstractmethod
    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the prompt for `messages` takes (chat template included)."""

    def close(self) -> None:
        """Free what the backend holds (GPU memory, connections)."""
