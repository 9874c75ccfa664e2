"""Continuous batching (engine/llm/scheduler.py) on the fast path's batched decode step
(kernels/q8.c q8_decode, FastLM.step): a batch computes what each sequence alone would,
sequences join and leave mid-run, a Stop frees its slot at once, the page and voice go
before the API, a full queue is refused, and answers are the same batched or not."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from engine.config import load_config
from engine.events import CancelToken
from engine.llm import load_backend
from engine.llm.base import GenParams
from engine.llm.fastpath import FastLM
from engine.llm.kernels import q8
from engine.llm.scheduler import API, INTERACTIVE, Scheduler
from engine.llm.tiny import build_tiny_model
from engine.queueing import QueueFull
from tests.conftest import concurrently
from test_fastpath import on_gguf_grids, run, tiny_qwen2

PROMPTS = [[5, 17, 3, 38, 41, 9, 20], [7, 34, 33], [2, 31, 15, 29, 4, 28, 11, 12, 13, 40, 6], [19, 23]]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    built = q8.load(tmp_path_factory.mktemp("kernels"))
    assert built is not None, q8.reason()
    return built


def alone(model, ids: list[int], lib, x8: int = 0, compact: bool = False) -> torch.Tensor:
    """Logits of each position of `ids` run one token at a time on a one-slot FastLM."""
    fast = FastLM.attach(model, capacity=64, int8=lib, x8=x8, compact=compact)
    with torch.inference_mode():
        return torch.cat([fast.forward([t]) for t in ids])


def on_5bit_grids(model):
    """Every matrix's 32-weight blocks on 32 affine levels (as Q5_0/Q5_1/Q5_K blocks)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                b = p.view(p.shape[0], -1, 32)
                lo = b.amin(-1, keepdim=True)
                d = ((b.amax(-1, keepdim=True) - lo) / 31).clamp(min=1e-12)
                b.copy_(lo + torch.round((b - lo) / d) * d)
    return model


BUILDS = {"llama-gqa": lambda: build_tiny_model(3)[0], "qwen2-biases": tiny_qwen2,
          "llama-4bit": lambda: on_gguf_grids(build_tiny_model(6)[0]),
          "qwen2-5bit": lambda: on_5bit_grids(tiny_qwen2(4))}


# Quantized activations: on the Qwen2-shaped models only. The random Llamas (a large init) are
# chaotic: a float rounding apart between two runs moves a value across a quantization step, and
# two layers later the logits are 2-5% apart; their exact batching is checked on the other paths.
CASES = [(b, p) for b in BUILDS for p in ("int8", "fp32")] + \
    [(b, "int8-x8") for b in ("qwen2-biases", "qwen2-5bit")]


@pytest.mark.parametrize("build,path", CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_batched_logits_equal_each_sequence_alone(lib, build, path):
    """Four sequences of different lengths decode together, a token each per step (in
    shuffled slot order, the shorter ones leaving early); every row equals that sequence run
    alone, on the int8 kernel (4- and 8-bit codes; activations in fp32 or int8) and on the
    fp32 fallback. (How close int8 activations come to fp32: the layer test below, and
    bench/serving.py's agreement on the real model.)"""
    model = BUILDS[build]()
    kernel = lib if path != "fp32" else None
    x8 = int(path == "int8-x8")
    want = [alone(model, ids, kernel, x8=x8, compact="5bit" in build) for ids in PROMPTS]
    fast = FastLM.attach(model, capacity=64, int8=kernel, slots=5, x8=x8, compact="5bit" in build)
    assert (fast.decoder is not None) == (path != "fp32")
    if build == "qwen2-5bit" and kernel is not None:
        assert {q.bits for layer in fast.layers for q in layer.q8.values()} == {5}
    got = [[] for _ in PROMPTS]
    order = [2, 0, 3, 1]  # slots in an order other than the sequences'
    with torch.inference_mode():
        for pos in range(max(map(len, PROMPTS))):
            live = [i for i in order if pos < len(PROMPTS[i])]
            logits = fast.step(live, [PROMPTS[i][pos] for i in live])
            for row, i in enumerate(live):
                got[i].append(logits[row])
    for i, ids in enumerate(PROMPTS):
        assert fast.lengths[i] == len(ids)
        rows = torch.stack(got[i])
        if "-x" in path:  # a float rounding apart may move a value across a quantization step
            assert ((rows - want[i]).abs() <= 0.01 * want[i].abs().amax(-1, keepdim=True)).all(), (build, i)
        else:
            assert torch.allclose(rows, want[i], rtol=1e-4, atol=1e-4), (build, i)


def test_a_batch_after_a_crop_and_a_copied_prefix(lib):
    """A slot cropped back (a conversation's kept prefix) and a slot that copied another's
    prefix both continue exactly as a fresh run of the whole sequence, side by side in one
    batch at different positions."""
    model = tiny_qwen2(1)
    ids = PROMPTS[2]
    want = alone(model, ids, lib)
    fast = FastLM.attach(model, capacity=64, int8=lib, slots=3, x8=False)
    with torch.inference_mode():
        fast.forward(ids[:6] + [1, 1, 1], 0)  # a wrong continuation...
        fast.crop(6, 0)  # ...dropped again
        fast.copy_prefix(0, 2, 4)
        assert fast.lengths[2] == 4
        assert torch.allclose(fast.step([2], [ids[4]])[0], want[4], rtol=1e-4, atol=1e-4)
        for pos in range(6, len(ids)):  # slot 0 at pos, slot 2 one behind
            logits = fast.step([2, 0], [ids[pos - 1], ids[pos]])
            assert torch.allclose(logits[1], want[pos], rtol=1e-4, atol=1e-4), pos
            assert torch.allclose(logits[0], want[pos - 1], rtol=1e-4, atol=1e-4), pos
    assert fast.lengths[0] == len(ids) and fast.lengths[2] == len(ids) - 1


def test_a_batch_needs_different_slots(lib):
    fast = FastLM.attach(build_tiny_model(0)[0], capacity=16, int8=lib, slots=2)
    with torch.inference_mode(), pytest.raises(ValueError, match="different slots"):
        fast.step([1, 1], [3, 4])


# ---- the scheduler -------------------------------------------------------------------------
def backend(tmp_path, parallel: int = 4, **over):
    cfg = load_config("tiny", overrides={"llm.max_parallel": parallel, **over}, env={})
    return load_backend(cfg.llm, tmp_path)


def answer(llm, text: str, n: int = 24, cancel=None, priority=INTERACTIVE, out=None):
    gen = llm.generate([{"role": "user", "content": text}], (), GenParams(max_new_tokens=n, temperature=0.0,
                                                                          priority=priority), cancel)
    parts = []
    while True:
        try:
            parts.append(next(gen).text)
            if out is not None:
                out.append(time.monotonic())
        except StopIteration as stop:
            return "".join(parts), stop.value


def test_answers_are_the_same_batched_or_one_at_a_time(tmp_path):
    """Greedy answers to six questions asked at once on four slots equal those asked one after
    another on one; the batch really ran (steps of more than one token). (fp32 activations:
    int8 ones are guarded by bench/serving.py's agreement on the real model.)"""
    questions = [f"Tell me about item {i} and the sea." for i in range(6)]
    one = backend(tmp_path / "a", parallel=1, **{"llm.activations": "fp32"})
    want = [answer(one, q)[0] for q in questions]
    many = backend(tmp_path / "b", parallel=4, **{"llm.activations": "fp32"})
    got = concurrently(lambda q: answer(many, q)[0], questions)
    assert got == want
    assert many.scheduler.stepped_tokens > many.scheduler.steps  # some step carried several sequences
    assert not many.scheduler.locked()
    one.close(), many.close()


def test_sequences_join_and_leave_mid_run_and_stop_frees_the_slot(tmp_path):
    """A sequence is mid-run (a driven one: it moves only when the test pushes); a second joins,
    runs to its end and leaves while the first still holds its slot and goes on; a Stop
    (cancelled from inside its own stream) ends a sampled sequence within one step, and the
    slot takes the next request. No timing involved."""
    llm = backend(tmp_path, parallel=2)
    sched = llm.scheduler
    held = sched.open([5, 6, 7, 8, 9])
    token = int(held.logits().argmax())
    short = answer(llm, "Hi.", n=5)  # joins beside it, finishes, leaves
    assert short[1]["completion_tokens"] == 5 and short[1]["finish_reason"] == "length"
    held.push(token)  # the first goes on after the other left
    assert held.logits().shape[0] == 1 and held.slot.owner is held
    held.close()

    cancel, seen = CancelToken(), []

    def sample(logits):  # the user presses Stop while the third token streams
        seen.append(int(logits.argmax()))
        if len(seen) == 3:
            cancel.cancel("stop")
        return 40 + len(seen)

    assert not {41, 42, 43} & llm.stop_ids
    seq = sched.submit([3, 4, 5], sample, max_new=100, cancel=cancel)
    assert list(seq.tokens()) == [41, 42, 43] and seq.finish == "cancelled"
    deadline = time.monotonic() + 5
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(slot.owner is None for slot in sched.slots) and not sched.locked()
    assert answer(llm, "Hi.", n=3)[1]["completion_tokens"] == 3  # the slot serves the next request
    llm.close()


def test_priority_then_arrival_and_a_full_queue_is_refused(tmp_path):
    """One slot, busy: the API requests that arrived first wait behind a later page/voice one;
    among equals, arrival order; beyond max_waiting, QueueFull."""
    llm = backend(tmp_path, parallel=1)
    sched = llm.scheduler
    sched.max_waiting = 3
    hold = sched.open([5, 6, 7, 8])  # a driven sequence holding the only slot
    hold.logits()
    order: list[str] = []
    seqs = {}
    for name, priority in (("api-1", API), ("api-2", API), ("page", INTERACTIVE)):
        seqs[name] = sched.submit([9, 10, 11], lambda logits, n=name: order.append(n) or 0, max_new=1,
                                  priority=priority)
    with pytest.raises(QueueFull):
        sched.submit([9, 10], lambda logits: 0, max_new=1)
    assert sched.full() and sched.waiting == 3
    hold.close()
    for seq in seqs.values():
        list(seq.tokens())
    assert order == ["page", "api-1", "api-2"]
    llm.close()


def test_a_driven_sequence_abandoned_midway_frees_its_slot(tmp_path):
    llm = backend(tmp_path, parallel=1)
    steps = llm.steps(llm.encode([{"role": "user", "content": "choose"}]))
    steps.push(int(steps.logits.argmax()))
    steps.close()
    text, usage = answer(llm, "Still there?", n=4)  # the only slot came back
    assert usage["completion_tokens"] == 4
    llm.close()


def test_the_next_turn_reuses_its_conversation_and_new_chats_the_primed_prompt(tmp_path):
    """The primed system prompt is copied into a new chat's slot; after another chat took a
    slot meanwhile, the next turn still finds its whole conversation so far."""
    llm = backend(tmp_path, parallel=3)
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly and well."}
    primed = llm.prime([system])
    assert primed > 16
    chat = [system, {"role": "user", "content": "Tell me about boats."}]
    first, usage = run(llm, chat, 8)
    assert usage["cached_prompt_tokens"] == primed
    assert answer(llm, "x")[1]["completion_tokens"] > 0  # another chat, another slot
    follow = chat + [{"role": "assistant", "content": first}, {"role": "user", "content": "And ships?"}]
    assert run(llm, follow, 4)[1]["cached_prompt_tokens"] > primed + 8  # the whole first turn
    llm.close()


def test_the_engine_serves_a_voice_turn_beside_a_streaming_chat(tmp_path):
    """While a chat's answer is mid-stream (its sequence holds a slot and is not finished), a
    voice-style turn and an API completion through the engine both complete: nothing waits
    for the chat to end, and the engine's lock is never taken for a scheduling backend. Then
    three turns at once on threads all complete."""
    from engine.engine import Engine
    from engine.events import TextDelta

    engine = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "llm.max_parallel": 4}, env={}))
    llm = engine.llm()
    assert llm.schedules and engine.model_queue is llm.scheduler

    def turn(name: str, n: int = 8, api: bool = False) -> int:
        params = engine.params(max_new_tokens=n, temperature=0.0)
        msgs = [{"role": "user", "content": f"{name}: say something"}]
        gen = engine.complete(msgs, params, CancelToken()) if api else engine.answer(msgs, params, CancelToken())
        return sum(isinstance(event, TextDelta) for event in gen)

    chat = llm.scheduler.open(llm.encode([{"role": "user", "content": "Tell me a long story."}]))
    chat.push(int(chat.logits().argmax()))  # mid-answer
    chat.logits()
    assert turn("voice") > 0 and turn("api", api=True) > 0
    assert chat.finish is None and not engine.model_lock.busy
    chat.close()
    assert all(n > 0 for n in concurrently(lambda name: turn(name, 40, name == "api"), ["chat", "voice", "api"]))
    assert not engine.model_lock.busy
    engine.close()


def test_max_parallel_is_checked_and_shown(tmp_path):
    from engine.config import ConfigError
    from engine.engine import Engine
    from engine.status import status

    with pytest.raises(ConfigError, match="max_parallel"):
        load_config("tiny", overrides={"llm.max_parallel": 0}, env={})
    engine = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "llm.max_parallel": 3}, env={}))
    engine.llm()
    serving = status(engine)["model"]["serving"]
    assert serving["mode"] == "continuous batching" and serving["slots"] == 3
    engine.close()
    one = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path / "t"), "llm.decode": "transformers"},
                             env={}))
    one.llm()
    assert status(one)["model"]["serving"] == {"mode": "one at a time", "slots": 1}
    one.close()


def test_a_closed_scheduler_ends_its_sequences(tmp_path):
    llm = backend(tmp_path, parallel=1)
    sched: Scheduler = llm.scheduler
    seq = sched.open([3, 4, 5])
    seq.logits()
    sched.close()
    with pytest.raises(RuntimeError):
        seq.logits()
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit([1, 2], None)
    llm.scheduler = None
    llm.close()


def test_greedy_params_in_replace_keep_priority():
    assert replace(GenParams(), priority=API).priority == API


@pytest.mark.parametrize("rows,cols,bits,bias", [(40, 96, 8, True), (30, 64, 4, False), (13, 320, 8, False),
                                                (21, 160, 5, True)],
                         ids=["8-bit+bias", "4-bit", "8-bit-wide", "5-bit"])
def test_int8_activations_stay_within_their_rounding(lib, rows, cols, bits, bias):
    """q8_linear_x8 for 1 to 9 tokens (blocks of 4 with tails, eight groups at a time with a
    tail): each output within the error of rounding the activations per 32 to int8 (bounded by
    sum |w| * step / 2 per group)."""
    torch.manual_seed(cols + bits)
    levels = {4: 16, 5: 32, 8: 256}[bits]
    w = torch.randint(0, levels, (rows, cols)).float() * torch.rand(rows, 1) * 0.1 - 0.3
    b = torch.randn(rows) if bias else None
    layer = q8.Q8Linear(w, b, lib, compact=True)
    assert layer.bits == bits
    dense = layer.dequantized()
    for tokens in (1, 2, 3, 4, 5, 9):
        x = torch.randn(tokens, cols)
        want = torch.nn.functional.linear(x, dense, b)
        step = x.view(tokens, -1, 32).abs().amax(-1) / 127  # each group's rounding step
        bound = (dense.abs().view(rows, -1, 32).sum(-1) @ (step / 2).T).T + 1e-4  # [tokens, rows]
        err = (layer.x8(x) - want).abs()
        assert (err <= bound).all(), (tokens, float((err - bound).max()))
        assert float(err.max()) > 0  # (really the quantized path: fp32 would be exact)

