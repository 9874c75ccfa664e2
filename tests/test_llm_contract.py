"""One contract every LLM backend passes. A new backend adds a subclass
with a `backend` fixture and gets the whole suite."""
from __future__ import annotations

import importlib.util

import pytest

from engine.config import LLMConfig, load_config
from engine.errors import Unavailable
from engine.events import CancelToken, TextDelta
from engine.llm import load_backend
from engine.llm.base import GenParams

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a long story."}]
ROOM = {"context_tokens": "2048"}  # (the tiny tokenizer spells a tool's prompt letter by letter)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


def run(backend, params=GenParams(max_new_tokens=24, temperature=0.0), cancel=None, messages=MSGS):
    gen = backend.generate(messages, (), params, cancel)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


class LLMContract:
    def test_streams_text_deltas_and_reports_usage(self, backend):
        events, usage = run(backend)
        assert events and all(isinstance(e, TextDelta) for e in events)
        assert "".join(e.text for e in events).strip()
        assert 0 < usage["completion_tokens"] <= 24
        assert usage["finish_reason"] in ("stop", "length")

    def test_respects_max_new_tokens(self, backend):
        _, usage = run(backend, GenParams(max_new_tokens=5, temperature=0.0))
        assert usage["completion_tokens"] <= 5

    def test_cancel_stops_within_one_step(self, backend):
        cancel = CancelToken()
        gen = backend.generate(MSGS, (), GenParams(max_new_tokens=200, temperature=0.0), cancel)
        seen = 0
        try:
            while True:
                next(gen)
                seen += 1
                if seen == 3:
                    cancel.cancel()
        except StopIteration as stop:
            usage = stop.value
        assert usage["finish_reason"] == "cancelled"
        assert seen <= 4 and usage["completion_tokens"] <= 4

    def test_cancel_before_start_generates_nothing(self, backend):
        cancel = CancelToken()
        cancel.cancel()
        events, usage = run(backend, cancel=cancel)
        assert len(events) <= 1 and usage["finish_reason"] == "cancelled"

    def test_what_it_declares_beyond_text_it_honours(self, backend):
        """features: a JSON answer under its schema, a forced tool call whose arguments validate,
        each token's log-probability. A backend that declares none of them is refused them by the API."""
        import json

        import jsonschema

        from engine.events import ToolCallDelta

        features = backend.features
        if "response_format" in features:
            events, _ = run(backend, GenParams(max_new_tokens=80, temperature=0.7, response_format={"schema": PERSON}))
            jsonschema.validate(json.loads("".join(e.text for e in events)), PERSON)
        if "tools" in features:
            tool = {"type": "function", "function": {"name": "person", "parameters": PERSON}}
            events, usage = run(backend, GenParams(max_new_tokens=80, temperature=0.0, tools=(tool,),
                                                   tool_choice="required"))
            calls = [e for e in events if isinstance(e, ToolCallDelta)]
            assert usage["finish_reason"] == "tool_calls" and calls[0].name == "person"
            jsonschema.validate(json.loads("".join(c.arguments for c in calls)), PERSON)
        if "logprobs" in features:
            events, usage = run(backend, GenParams(max_new_tokens=6, temperature=0.0, logprobs=2))
            entries = [entry for e in events for entry in e.logprobs]
            assert len(entries) == usage["completion_tokens"]
            assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)

    def test_count_tokens_grows_with_the_prompt(self, backend):
        short = backend.count_tokens([{"role": "user", "content": "hi"}])
        long = backend.count_tokens([{"role": "user", "content": "hi " * 50}])
        assert 0 < short < long
        assert backend.context_tokens > 0 and backend.name


class TestTransformersBackend(LLMContract):
    @pytest.fixture(scope="class")
    def backend(self, tmp_path_factory):
        cfg = load_config("tiny", overrides=ROOM, env={}).llm
        b = load_backend(cfg, tmp_path_factory.mktemp("models"))
        yield b
        b.close()

    def test_same_seed_same_text(self, backend):
        p = GenParams(max_new_tokens=16, temperature=0.8, seed=7)
        a, _ = run(backend, p)
        b, _ = run(backend, p)
        assert [e.text for e in a] == [e.text for e in b]

    def test_one_seed_draws_afresh_for_each_prompt(self, backend):
        """The seed is the same every turn (config llm.seed); were it used as is, every
        answer would take the same random draws, and a near-flat distribution gives
        the same tokens whatever the prompt (the answer to one question repeated as
        the next one's). Mixed with the prompt, another prompt draws afresh."""
        flat = GenParams(max_new_tokens=16, temperature=1000.0, top_p=1.0, seed=3)
        other = [MSGS[0], {"role": "user", "content": "What is 2 + 2?"}]
        a, _ = run(backend, flat)
        b, _ = run(backend, flat, messages=other)
        assert "".join(e.text for e in a) != "".join(e.text for e in b)

    def test_next_turn_reuses_the_kv_cache_and_answers_the_same(self, backend, tmp_path):
        first, _ = run(backend, GenParams(max_new_tokens=12, temperature=0.0))
        follow = MSGS + [{"role": "assistant", "content": "".join(e.text for e in first)},
                         {"role": "user", "content": "And then?"}]
        reused, usage = run(backend, GenParams(max_new_tokens=12, temperature=0.0), messages=follow)
        assert usage["cached_prompt_tokens"] > len(MSGS[1]["content"])  # the history was not recomputed
        fresh = load_backend(load_config("tiny", env={}).llm, tmp_path)
        plain, usage = run(fresh, GenParams(max_new_tokens=12, temperature=0.0), messages=follow)
        assert usage["cached_prompt_tokens"] == 0
        assert [e.text for e in reused] == [e.text for e in plain]

    def test_prompt_longer_than_context_is_a_clear_error(self, backend):
        with pytest.raises(ValueError, match="context holds"):
            run(backend, messages=[{"role": "user", "content": "x" * 5000}])

    def test_a_primed_system_prompt_is_reused_and_answers_the_same(self, backend):
        """The app primes every chat's shared start (the system prompt) when the model loads:
        a new chat's first turn then reuses it, and answers as it would from scratch."""
        backend.forget()
        primed = backend.prime(MSGS[:1])
        reused, usage = run(backend, GenParams(max_new_tokens=12, temperature=0.0))
        backend.forget()
        plain, fresh = run(backend, GenParams(max_new_tokens=12, temperature=0.0))
        assert fresh["cached_prompt_tokens"] == 0
        assert [e.text for e in reused] == [e.text for e in plain]
        if backend.fast is not None:
            assert primed > 16 and usage["cached_prompt_tokens"] == primed
        else:  # (no fast path: transformers' cache is built per answer, nothing to prime)
            assert primed == 0


class TestOpenAIBackend(LLMContract):
    """Against this app's own OpenAI-compatible server (tiny model) on 127.0.0.1."""

    @pytest.fixture(scope="class")
    def backend(self, server):
        cfg = LLMConfig(backend="openai", model="default", base_url=server.url + "/v1", context_tokens=256)
        b = load_backend(cfg, None)
        yield b
        b.close()

    def test_unreachable_server_is_unavailable(self):
        from tests.conftest import free_port

        cfg = LLMConfig(backend="openai", model="default", base_url=f"http://127.0.0.1:{free_port()}/v1")
        with pytest.raises(Unavailable, match="no OpenAI-compatible server"):
            load_backend(cfg, None)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (make llamacpp)")
class TestLlamaCppBackend(LLMContract):
    @pytest.fixture(scope="class")
    def backend(self, tmp_path_factory):
        cfg = LLMConfig(backend="llamacpp", model="smollm2-135m", context_tokens=1024)
        return load_backend(cfg, tmp_path_factory.mktemp("models"))


def test_unknown_model_says_what_to_set(tmp_path):
    with pytest.raises(Unavailable, match="smollm2-135m"):
        load_backend(LLMConfig(model="no-such-model"), tmp_path)


def test_cuda_device_without_cuda_is_unavailable(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(Unavailable, match="no CUDA GPU"):
        load_backend(LLMConfig(model="tiny", device="cuda"), tmp_path)


class TestQuantizedBackend(TestTransformersBackend):
    """bitsandbytes 4-bit (its CPU backend here; CUDA on the gpu profile), through the real
    from_pretrained path: the tiny model is saved and loaded like a checkpoint."""

    @pytest.fixture(scope="class")
    def backend(self, tmp_path_factory):
        pytest.importorskip("bitsandbytes")
        cfg = load_config("tiny", overrides={"quantization": "4bit", **ROOM}, env={}).llm
        b = load_backend(cfg, tmp_path_factory.mktemp("models"))
        yield b
        b.close()

    def test_next_turn_reuses_the_kv_cache_and_answers_the_same(self, backend, tmp_path):
        first, _ = run(backend, GenParams(max_new_tokens=12, temperature=0.0))
        follow = MSGS + [{"role": "assistant", "content": "".join(e.text for e in first)},
                         {"role": "user", "content": "And then?"}]
        reused, usage = run(backend, GenParams(max_new_tokens=12, temperature=0.0), messages=follow)
        assert usage["cached_prompt_tokens"] > len(MSGS[1]["content"])
        backend.forget()
        plain, usage = run(backend, GenParams(max_new_tokens=12, temperature=0.0), messages=follow)
        assert usage["cached_prompt_tokens"] == 0
        assert [e.text for e in reused] == [e.text for e in plain]


class TestLeanBackend(TestTransformersBackend):
    """A checkpoint folder read without transformers (engine/llm/lean.py), as the cpu
    profile's converted GGUF is: the same contract."""

    @pytest.fixture(scope="class")
    def backend(self, tmp_path_factory):
        from engine.llm.tiny import build_tiny_model, save_tiny_checkpoint
        from tests.test_fastpath import on_gguf_grids

        model, tokenizer = build_tiny_model(6)
        folder = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), on_gguf_grids(model), tokenizer)
        cfg = load_config("tiny", overrides={"llm.model": str(folder), **ROOM}, env={}).llm
        b = load_backend(cfg, tmp_path_factory.mktemp("models"))
        assert b.lean is not None
        yield b
        b.close()

    def test_next_turn_reuses_the_kv_cache_and_answers_the_same(self, backend, tmp_path):
        TestQuantizedBackend.test_next_turn_reuses_the_kv_cache_and_answers_the_same(self, backend, tmp_path)


class TestOmniBackbone(TestTransformersBackend):
    """The omni backbone (Qwen2.5-Omni's thinker, tiny) as a text LLM: the same contract."""

    @pytest.fixture(scope="class")
    def backend(self, tmp_path_factory):
        cfg = load_config("tiny", overrides={"llm": "tiny-omni", **ROOM}, env={}).llm
        b = load_backend(cfg, tmp_path_factory.mktemp("models"))
        yield b
        b.close()

    def test_next_turn_reuses_the_kv_cache_and_answers_the_same(self, backend, tmp_path):
        TestQuantizedBackend.test_next_turn_reuses_the_kv_cache_and_answers_the_same(self, backend, tmp_path)


def test_capabilities_are_declared_not_probed(tmp_path):
    """What a backend can do beyond generate() it declares; the base says "cannot"."""
    from engine.llm.base import LLMBackend

    class Plain(LLMBackend):
        def generate(self, messages, media=(), params=GenParams(), cancel=None):
            yield TextDelta("hi")
            return {}

        def count_tokens(self, messages):
            return 1

    plain = Plain()
    assert not plain.constrained and plain.media_kinds == frozenset() and plain.park() == 0
    with pytest.raises(NotImplementedError):
        plain.choose(MSGS, ["a", "b"])
    local = load_backend(load_config("tiny", env={}).llm, tmp_path)
    assert local.constrained and local.media_kinds == frozenset()
    best, scores = local.choose(MSGS, ["yes", "no"])
    assert best in ("yes", "no") and len(scores) == 2
