"""engine.speech.talker: our own thinker loop + talk() speaks exactly what HF's
Qwen2_5OmniForConditionalGeneration.generate speaks (tiny seeded random model)."""
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.speech.talker import SAMPLE_RATE, ThinkerTrace, build_tiny_omni, talk  # noqa: E402
from generators.base import Cancelled  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

THINKER_TOKENS, TALKER_TOKENS = 6, 12


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_tiny_omni(seed=0)
    ids = proc.tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return model, ids, proc


class Cancel:
    def __init__(self, cancelled=False):
        self.cancelled = cancelled


def greedy_trace(model, input_ids, max_new_tokens, **media):
    """Our engine's kind of loop: plain forwards with a KV cache, hidden states recorded."""
    thinker = model.thinker
    gen = thinker.generation_config
    suppress = list(gen.suppress_tokens or [])
    eos = {gen.eos_token_id} if isinstance(gen.eos_token_id, int) else set(gen.eos_token_id)
    trace = ThinkerTrace.from_inputs(dict(media, input_ids=input_ids))
    with torch.no_grad():
        out = thinker(input_ids=input_ids, use_cache=True, output_hidden_states=True, **media)
        trace.add(out.hidden_states)
        while True:
            logits = out.logits[:, -1, :].float()
            logits[:, suppress] = -float("inf")
            token = int(logits.argmax(-1))
            trace.reply_ids.append(token)
            if token in eos or len(trace.reply_ids) == max_new_tokens:
                break  # like HF: the final token is never forwarded
            out = thinker(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True,
                          output_hidden_states=True)
            trace.add(out.hidden_states)
    return trace


@pytest.fixture
def talker_calls(tiny, monkeypatch):
    """Every talker.generate call's arguments (tensors cloned: the talker edits inputs_embeds in place)."""
    talker, calls = tiny[0].talker, []
    real = talker.generate

    def spy(**kwargs):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
        return real(**kwargs)

    monkeypatch.setattr(talker, "generate", spy)
    return calls


def same_call(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def check_against_hf(model, input_ids, talker_calls, hf_media=None, media=None):
    talker_eos = [model.talker.codec_pad_token, model.talker.codec_eos_token]
    torch.manual_seed(7)  # token2wav's diffusion starts from noise
    sequences, hf_wav = model.generate(input_ids, thinker_max_new_tokens=THINKER_TOKENS, thinker_do_sample=False,
                                       talker_do_sample=False, talker_max_new_tokens=TALKER_TOKENS,
                                       talker_eos_token_id=talker_eos, **(hf_media or {}))
    hf_wav = hf_wav.numpy()

    trace = greedy_trace(model, input_ids, THINKER_TOKENS, **(media or {}))
    assert trace.reply_ids == sequences[0, input_ids.shape[1]:].tolist()
    assert len(trace.hidden) == len(trace.reply_ids) == THINKER_TOKENS
    wav = talk(model, trace, do_sample=False, max_new_tokens=TALKER_TOKENS, seed=7)

    same_call(talker_calls[0], talker_calls[1])  # the very same talker inputs and generate kwargs
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0
    assert wav.shape == hf_wav.shape
    assert np.allclose(wav, hf_wav, rtol=1e-5, atol=1e-8)
    return trace, hf_wav


def test_talk_matches_hf_generate(tiny, talker_calls):
    model, ids, _ = tiny
    trace, hf_wav = check_against_hf(model, ids, talker_calls)
    assert SAMPLE_RATE == 24000

    # a loop that also forwards its last token leaves an extra entry: ignored
    trace.add((trace.embeds[-1], trace.hidden[-1]))
    again = talk(model, trace, do_sample=False, max_new_tokens=TALKER_TOKENS, seed=7)
    assert np.allclose(again, hf_wav, rtol=1e-5, atol=1e-8)
    # cancel not set: the stopping criterion changes nothing
    assert np.allclose(talk(model, trace, do_sample=False, max_new_tokens=TALKER_TOKENS, seed=7, cancel=Cancel()),
                       hf_wav, rtol=1e-5, atol=1e-8)


def test_talk_matches_hf_generate_with_image(tiny, talker_calls):
    from PIL import Image

    model, _, proc = tiny
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                                    tokenize=False, add_generation_prompt=True)
    image = Image.fromarray((np.random.RandomState(0).rand(56, 84, 3) * 255).astype(np.uint8))
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    ids = inputs["input_ids"]
    media = dict(attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                 image_grid_thw=inputs["image_grid_thw"])
    # HF quirk: a plain pixel_values also reaches talker.generate, which rejects it; route it to the thinker
    hf_media = dict(attention_mask=media["attention_mask"], image_grid_thw=media["image_grid_thw"],
                    thinker_pixel_values=media["pixel_values"])
    trace, _ = check_against_hf(model, ids, talker_calls, hf_media, media)
    assert trace.image and (ids == model.config.thinker_config.image_token_index).any()


def test_sampling_is_seeded(tiny):
    model, ids, _ = tiny
    trace = greedy_trace(model, ids, 4)
    a = talk(model, trace, max_new_tokens=8, seed=3)
    b = talk(model, trace, max_new_tokens=8, seed=3)
    assert a.size > 0 and np.array_equal(a, b)


def test_cancelled_before_start_raises(tiny):
    model, ids, _ = tiny
    trace = greedy_trace(model, ids, 4)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        talk(model, trace, do_sample=False, max_new_tokens=TALKER_TOKENS, cancel=Cancel(True))
    assert time.monotonic() - start < 1.0


def test_cancel_during_talker_generation_raises(tiny):
    model, ids, _ = tiny
    trace = greedy_trace(model, ids, 4)
    cancel = Cancel()
    calls = []

    def step(*args):  # each talker forward sets cancel (returns None: output unchanged)
        calls.append(1)
        cancel.cancelled = True

    hook = model.talker.register_forward_hook(step)
    try:
        with pytest.raises(Cancelled):
            talk(model, trace, do_sample=False, max_new_tokens=500, cancel=cancel)
    finally:
        hook.remove()
    assert len(calls) <= 2  # stopped after the first step, not 500


def test_unknown_speaker_names_available(tiny):
    model, ids, _ = tiny
    trace = greedy_trace(model, ids, 4)
    with pytest.raises(ValueError, match="Nobody") as err:
        talk(model, trace, speaker="Nobody")
    assert "Chelsie" in str(err.value) and "Ethan" in str(err.value)


def test_too_short_reply_is_silent(tiny):
    model, ids, _ = tiny
    trace = greedy_trace(model, ids, 1)
    assert talk(model, trace, do_sample=False).size == 0
