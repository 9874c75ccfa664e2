"""A checkpoint read without transformers (engine/llm/lean.py) computes exactly what
transformers computes from the same folder: the same logits at every position (Llama,
Qwen2 with q/k/v biases, a bf16 file), the same token ids and chat prompts, the same
answers, choices and JSON through the backend; folders it cannot read go to transformers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.llm import load_backend
from engine.llm.base import GenParams
from engine.llm.fastpath import FastLM
from engine.llm.lean import Checkpoint
from engine.llm.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_checkpoint
from tests.test_fastpath import IDS, computes, lib, on_gguf_grids, reference, run, tiny_qwen2  # noqa: F401 (lib: a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("build, dtype", [(lambda: build_tiny_model(3)[0], None), (tiny_qwen2, None),
                                          (lambda: build_tiny_model(4)[0], torch.bfloat16)],
                         ids=["llama", "qwen2-biases", "llama-bf16"])
def test_logits_match_transformers_at_every_position(tmp_path, build, dtype):
    from transformers import AutoModelForCausalLM

    model = build()
    save_tiny_checkpoint(tmp_path, model if dtype is None else model.to(dtype), build_tiny_tokenizer())
    # transformers reading the same folder (a bf16 file too) in fp32
    want = reference(AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval(), IDS)
    checkpoint = Checkpoint.open(tmp_path)
    assert checkpoint is not None
    computes(FastLM(checkpoint.weights(), capacity=64), want, rtol=1e-5)


def test_int8_keeps_only_the_codes_and_computes_the_gguf_model(tmp_path, lib):
    """With int8, a lean load keeps no fp32 matrix (prompts run from the codes, q8_gemm) and
    still computes transformers' model exactly when the weights lie on GGUF grids: the
    logits of every decode step and of a whole prompt, for Llama and Qwen2 (biases)."""
    from transformers import AutoModelForCausalLM

    for build in (lambda: build_tiny_model(6)[0], tiny_qwen2):
        folder = save_tiny_checkpoint(tmp_path / str(len(list(tmp_path.iterdir()))), on_gguf_grids(build()),
                                      build_tiny_tokenizer())
        want = reference(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), IDS)
        fast = FastLM(Checkpoint.open(folder).weights(), capacity=64, int8=lib)
        assert all(la.qkv is None and la.o is None and la.gate_up is None and la.down is None for la in fast.layers)
        computes(fast, want)


def test_the_tokenizer_and_chat_template_match_transformers(tmp_path):
    from transformers import AutoTokenizer

    save_tiny_checkpoint(tmp_path)
    ours, theirs = Checkpoint.open(tmp_path).tokenizer, AutoTokenizer.from_pretrained(str(tmp_path))
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me\na story."},
              {"role": "assistant", "content": "Once, {a} <|im_end|> fox."}, {"role": "user", "content": "go on"}]]
    for chat in chats:
        for opened in (True, False):
            assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=opened) == \
                theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=opened)
    for text in ("plain words", "  spaces\nand\ttabs ~!", "caf\u00e9 \u2603 <|im_start|>user"):
        ids = ours(text, add_special_tokens=False).input_ids
        assert ids == theirs(text, add_special_tokens=False).input_ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert (ours.eos_token_id, ours.unk_token_id) == (theirs.eos_token_id, theirs.unk_token_id)
    assert ours.convert_tokens_to_ids("<|im_end|>") == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)  # (bench/text.py: CTranslate2's input)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_folders_it_cannot_read_go_to_transformers(tmp_path):
    scaled = save_tiny_checkpoint(tmp_path / "scaled")
    _edit_json(scaled / "config.json", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert Checkpoint.open(scaled) is None  # a scaled RoPE: transformers computes it
    moe = save_tiny_checkpoint(tmp_path / "moe")
    _edit_json(moe / "config.json", model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    assert Checkpoint.open(moe) is None
    torn = save_tiny_checkpoint(tmp_path / "torn")
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert Checkpoint.open(torn) is None
    from engine.errors import Unavailable

    with pytest.raises(Unavailable, match="could not load"):  # transformers says what is wrong with it
        load_backend(load_config("tiny", overrides={"llm.model": str(torn)}, env={}).llm, tmp_path)


def _lean_and_transformers(folder: Path, tmp_path: Path):
    cfgs = [load_config("tiny", overrides={"llm.model": str(folder), "llm.decode": mode}, env={}).llm
            for mode in ("int8", "transformers")]
    return [load_backend(cfg, tmp_path) for cfg in cfgs]


def test_the_backend_answers_chooses_and_calls_tools_like_transformers(tmp_path):
    from engine.llm import structured

    folder = save_tiny_checkpoint(tmp_path / "ckpt", on_gguf_grids(build_tiny_model(6)[0]), build_tiny_tokenizer())
    lean, plain = _lean_and_transformers(folder, tmp_path)
    assert lean.lean is not None and plain.lean is None and lean._model is None
    assert lean.decode_path == "fast path, int8 weights (C kernel)"
    msgs = [{"role": "user", "content": "Hello there."}]
    assert run(lean, msgs, n=16)[0] == run(plain, msgs, n=16)[0]
    assert lean.stop_ids == plain.stop_ids and lean.context_tokens == plain.context_tokens
    options = ["yes", "no", "a longer answer here"]
    (best_a, scores_a), (best_b, scores_b) = lean.choose(msgs, options), plain.choose(msgs, options)
    assert best_a == best_b and scores_a == pytest.approx(scores_b, abs=1e-3)
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["count"], "additionalProperties": False}
    assert structured.json_call(lean, msgs, schema, max_new_tokens=32) == \
        structured.json_call(plain, msgs, schema, max_new_tokens=32)
    assert lean.model is not None and lean._model is not None  # transformers' model, built when asked for


def test_a_lean_load_never_imports_transformers(tmp_path):
    """The point of the lean path: a warm start's language model costs no transformers import."""
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    code = ("import sys; from engine.config import load_config; from engine.llm import load_backend;"
            "from engine.llm.base import GenParams;"
            f"b = load_backend(load_config('tiny', overrides={{'llm.model': {str(folder)!r}}}, env={{}}).llm, {str(tmp_path)!r});"
            "text = ''.join(e.text for e in b.generate([{'role': 'user', 'content': 'hi'}], (), GenParams(8, 0.0)));"
            "assert b.lean is not None and text;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
