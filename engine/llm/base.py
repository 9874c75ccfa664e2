"""The one contract every LLM backend implements.

`generate(messages, media, params, cancel)` is a generator of TextDelta events
(and, for a mixture-of-experts model, one RouterStats at the end). It checks
`cancel` before every decoding step and returns (StopIteration.value) a usage
dict: `{"prompt_tokens", "completion_tokens", "finish_reason"}` where
finish_reason is "stop", "length" or "cancelled".

What a backend can do beyond that it declares here, with defaults that say
"cannot": `media_kinds` (attachments the model itself sees), `constrained`
(`choose` and `json_call`: local weights whose logits it can score and mask),
`decode_path`, `talker_model` (an omni model's speech head) and
`park`/`ready` (giving its GPU room to a diffusion pipeline). Callers read
these; they never probe a backend's attributes.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Generator, Sequence

from engine.events import CancelToken, RouterStats, TextDelta

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    #: mixed with the prompt (`answer_seed`): the same seed and prompt give the same answer
    seed: int = 0
    #: who waits first when the model is busy (engine/llm/scheduler.py): 0 the page and voice, 1 the API
    priority: int = 0
    #: which installed LLM answers (Engine.llm_choices; "": the configured one)
    model: str = ""
    #: a list the backend appends the thinker's trace to (hidden states for an omni talker)
    trace: list | None = field(default=None, compare=False)
    #: OpenAI's sampling extras (`LLMBackend.features` says which a backend honours):
    #: penalties on tokens already in the answer, a bias per token id, and the log-probabilities
    #: of each chosen token with this many alternatives (None: not asked)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()  # ((token id, bias), ...)
    logprobs: int | None = None
    #: strings that end the answer where they appear, unshown (any backend: engine.answer)
    stop: tuple = ()
    #: the answer is JSON: {"schema": a JSON Schema} or {"schema": None} for any JSON object
    response_format: dict | None = field(default=None, compare=False)
    #: function tools the model may call (OpenAI's {"type": "function", "function": {...}} list),
    #: `tool_choice` ("auto", "required", or a tool's name) and whether several calls may come at once
    tools: tuple = field(default=(), compare=False)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True


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
    #: kinds of attachment the model itself takes in (an omni / vision-language backbone);
    #: the rest reach it as perception facts
    media_kinds: frozenset = frozenset()
    #: it can score a few options and decode schema-constrained JSON (`choose`, `json_call`)
    constrained: bool = False
    #: how the answer is decoded, for the status panel (e.g. "fast path, int8 weights"); None: not said
    decode_path: str | None = None
    #: the omni model's speech head, which speaks from the thinker's states (engine/speech/talker.py); None: none
    talker_model: object | None = None
    #: it queues and batches its own requests (engine/llm/scheduler.py), so the engine's lock is
    #: not taken around it; `scheduler` answers the queue's questions (waiting, busy, full)
    schedules: bool = False
    scheduler: object | None = None
    #: sequences it decodes at once
    parallel: int = 1
    #: what it honours beyond the plain answer: "tools", "response_format", "logprobs",
    #: "penalties", "logit_bias", "raw_prompt" (a prompt without the chat template), "fim"
    #: (fill in the middle: the model has FIM tokens). The API refuses (400) what is not here.
    features: frozenset = frozenset()

    @abstractmethod
    def generate(
        self,
        messages: Sequence[Message],
        media: Sequence = (),
        params: GenParams = GenParams(),
        cancel: CancelToken | None = None,
    ) -> Generator[TextDelta | RouterStats, None, dict]:
        """Stream the assistant's answer to `messages`."""

    @abstractmethod
    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the prompt for `messages` takes (chat template included)."""

    def close(self) -> None:
        """Free what the backend holds (GPU memory, connections)."""

    def choose(self, messages: Sequence[Message], options: Sequence[str]) -> tuple[str, list[float]]:
        """(the most likely of `options` as the answer, each option's log-probability); `constrained` only."""
        raise NotImplementedError(f"{type(self).__name__} cannot score options")

    def json_call(self, messages: Sequence[Message], schema: dict, cancel: CancelToken | None = None,
                  max_new_tokens: int = 256) -> tuple[dict, int]:
        """(an object satisfying `schema`, tokens generated); `constrained` only."""
        raise NotImplementedError(f"{type(self).__name__} cannot constrain its decoding")

    def prime(self, messages: Sequence[Message]) -> int:
        """Run the start every conversation shares (the system prompt) into the KV cache, so a
        new chat's first turn pays only for its own message; the tokens now cached (0: the
        backend keeps no cache between calls)."""
        return 0

    def limit_queue(self, max_waiting: int) -> None:
        """How many requests may wait for a scheduling backend before it refuses (QueueFull)."""

    def park(self, force: bool = False) -> int:
        """Give GPU room to a diffusion pipeline; the bytes freed (nothing to give by default)."""
        return 0

    def ready(self) -> None:
        """Take the room back before the next forward (after `park`)."""
