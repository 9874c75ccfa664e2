"""Speech: TTS, ASR, VAD and the duplex state machine, on the real packaged
models (Piper joe, Whisper tiny.en, Silero) and on scripted probabilities."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine.config import ASRConfig, TTSConfig, VADConfig
from engine.errors import Unavailable
from engine.events import CancelToken
from engine.speech.audio import prepare, to_mono_float32
from engine.speech.duplex import (BargeIn, Duplex, EndLikely, OnsetRejected, SpeechOnset, SpeechResumed, SpeechStarted,
                                  State, UtteranceEnded)
from engine.speech.tts import SentenceBuffer, SpeechStream, load_tts

SENTENCES = [
    "What is the capital of France?", "Please turn on the kitchen lights.", "How far away is the moon?",
    "I would like a cup of coffee.", "Tell me a story about a dragon.", "The weather is lovely today.",
    "Can you recommend a good book?", "My favourite colour is green.", "Set a timer for ten minutes.",
    "Where is the nearest train station?", "The children are playing in the garden.",
]
RATE = 16000


@pytest.fixture(scope="module")
def tts():
    from engine.speech.tts import PiperTTS

    return PiperTTS("joe-us", variation=0.0)  # deterministic: durations and samples comparable


@pytest.fixture(scope="module")
def asr():
    from engine.speech.asr import load_asr

    return load_asr(ASRConfig())


@pytest.fixture(scope="module")
def vad():
    from engine.speech.vad import load_vad

    return load_vad(VADConfig())


# --- TTS ------------------------------------------------------------------

class TTSContract:
    def test_speaks_audible_audio(self, tts):
        audio = np.concatenate(list(tts.synthesize("Hello, how are you today?")))
        assert audio.dtype == np.float32 and 0.5 < len(audio) / tts.sample_rate < 5
        assert np.abs(audio).max() > 0.1

    def test_blank_text_gives_nothing(self, tts):
        assert list(tts.synthesize("  \n ")) == []

    def test_rate_changes_duration(self, tts):
        slow = sum(map(len, tts.synthesize("This sentence is spoken at two speeds.", rate=1.0)))
        fast = sum(map(len, tts.synthesize("This sentence is spoken at two speeds.", rate=1.5)))
        assert fast < 0.8 * slow

    def test_cancel_between_sentences(self, tts):
        cancel = CancelToken()
        chunks = []
        for chunk in tts.synthesize("One. Two. Three. Four.", cancel=cancel):
            chunks.append(chunk)
            cancel.cancel()
        assert len(chunks) == 1


class TestPiper(TTSContract):
    pass


def test_streaming_equals_one_shot(tts):
    text = "The sun rose over the hills. Birds began to sing. It was morning already. The day was warm."
    one_shot = np.concatenate(list(tts.synthesize(text)))
    stream = SpeechStream(tts)
    for i in range(0, len(text), 3):
        stream.push(text[i:i + 3])
    stream.close()
    pcm = b"".join(c.pcm for c in stream.events())
    streamed = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767
    assert abs(len(streamed) - len(one_shot)) <= 0.01 * len(one_shot)
    n = min(len(streamed), len(one_shot))
    assert np.corrcoef(streamed[:n], one_shot[:n])[0, 1] > 0.99


def test_first_chunk_before_the_text_is_complete(tts):
    stream = SpeechStream(tts)
    stream.push("This is the first sentence. And this one is still being wri")
    deadline, got = time.monotonic() + 20, []
    while not got and time.monotonic() < deadline:
        got = stream.poll()
        time.sleep(0.01)
    assert got and got[0].sample_rate == tts.sample_rate  # audio while the text is unfinished
    stream.cancel()
    assert list(stream.events()) == []


def test_sentence_buffer():
    b = SentenceBuffer()
    assert b.push("It costs 3.5 dollars, e.g. cheap. Dr. Smith ") == ["It costs 3.5 dollars, e.g. cheap."]
    assert b.push("agreed! **Bold** and") == ["Dr. Smith agreed!"]
    assert b.flush() == "Bold and"
    b = SentenceBuffer(first_clause_chars=10)
    assert b.push("Well, the answer is simple, really. More") == ["Well, the answer is simple,", "really."]
    b = SentenceBuffer(first_clause_chars=12)
    assert b.push("The capital of France is") == ["The capital of France"]  # no punctuation: a word boundary
    assert b.push(" Paris. Next") == ["is Paris."]


def test_unknown_voice_and_local_path(tts):
    from engine.packaged import resolve_named

    with pytest.raises(Unavailable, match="joe-us"):
        load_tts(TTSConfig(voice="nobody"))
    assert load_tts(TTSConfig(voice=str(resolve_named("tts", "joe-us")))).sample_rate == tts.sample_rate
    with pytest.raises(Unavailable, match="off"):
        load_tts(TTSConfig(backend="none"))


# --- VAD + ASR (the ASR contract is in test_asr.py) -------------------------

def test_wer_under_ten_percent_with_vad(asr, vad, say):
    """Real speech: Piper sentences separated by silence -> VAD -> Whisper."""
    from engine.speech.asr import word_error_rate
    from engine.speech.vad import utterances

    gap = np.zeros(RATE, np.float32)
    recording = np.concatenate([x for s in SENTENCES for x in (say(s), gap)])
    found = utterances(recording, vad, VADConfig())
    assert len(found) == len(SENTENCES)
    hyp = " ".join(asr.transcribe(a).text for _, _, a in found)
    assert word_error_rate(" ".join(SENTENCES), hyp) < 0.10


# --- audio ----------------------------------------------------------------

def test_audio_shapes_and_types():
    x = np.array([[0.5, -0.5], [1.5, -2.0]], np.float32)  # stereo, clipping
    assert np.allclose(to_mono_float32(x), [0.0, -0.25])
    assert to_mono_float32(np.array([32767, -32768], np.int16)).tolist() == pytest.approx([1.0, -1.0], abs=1e-4)
    assert to_mono_float32(b"").size == 0
    assert len(prepare(np.zeros(48000, np.int16), 48000, 16000)) == 16000
    assert prepare(np.zeros(0, np.float32), 48000).size == 0


# --- VAD and duplex -------------------------------------------------------

def test_vad_speech_vs_silence_and_noise(vad, say):
    speech = say("Hello there, how are you?")
    probs = [vad(speech[i:i + 512]) for i in range(0, len(speech) - 512, 512)]
    vad.reset()
    noise = (np.random.default_rng(0).normal(0, 0.05, RATE)).astype(np.float32)
    quiet = [vad(noise[i:i + 512]) for i in range(0, len(noise) - 512, 512)]
    assert max(probs) > 0.9 and np.mean(probs) > 0.5 and max(quiet) < 0.5
    with pytest.raises(ValueError, match="512"):
        vad(np.zeros(100, np.float32))


class Scripted:
    """A fake VAD returning scripted probabilities, one per frame."""

    def __init__(self, probs):
        self.probs = list(probs)

    def __call__(self, frame):
        return self.probs.pop(0) if self.probs else 0.0


CFG = VADConfig(min_speech_ms=250, end_silence_ms=500, min_barge_in_ms=400, speculate_ms=0, echo_guard=False)
F = 512 / RATE  # 32 ms


def frames(n):
    return np.zeros(512 * n, np.float32)


def test_scripted_turn_and_barge_in():
    probs = [0.9] * 20 + [0.1] * 20 + [0.0] * 10 + [0.9] * 5 + [0.1] * 15 + [0.9] * 15
    d = Duplex(Scripted(probs), CFG)
    d.start_listening()
    acts = d.feed(frames(40))
    assert [type(a) for a in acts] == [SpeechStarted, UtteranceEnded]
    assert len(acts[1].audio) >= 512 * 20
    d.thinking()
    d.playing(np.zeros(1600, np.float32))
    assert d.state is State.SPEAKING
    acts = d.feed(frames(30))  # silence, then a 160 ms burst: a pause, resumed, no interrupt
    assert [type(a) for a in acts] == [SpeechOnset, OnsetRejected]
    assert acts[0].t == pytest.approx((40 + 10 + 2) * F, abs=F)  # the audio pauses after ~64 ms
    acts = d.feed(frames(15))
    assert [type(a) for a in acts] == [SpeechOnset, BargeIn]
    assert acts[1].t == pytest.approx((40 + 30 + 13) * F, abs=F)  # after min_barge_in_ms (13 frames)
    assert [t[2] for t in d.transitions] == [State.LISTENING, State.THINKING, State.SPEAKING,
                                               State.INTERRUPTED, State.LISTENING]


def test_pause_is_a_likely_end_until_speech_resumes():
    # speech, a 224 ms pause (likely end at 200 ms), more speech, then silence (end at 500 ms)
    probs = [0.9] * 20 + [0.0] * 7 + [0.9] * 10 + [0.0] * 20
    d = Duplex(Scripted(probs), VADConfig(min_speech_ms=250, end_silence_ms=500, speculate_ms=200,
                                          echo_guard=False))
    d.start_listening()
    acts = d.feed(frames(57))
    assert [type(a) for a in acts] == [SpeechStarted, EndLikely, SpeechResumed, EndLikely, UtteranceEnded]
    assert acts[1].t == pytest.approx((20 + 7) * F, abs=F)
    # the second guess is the final utterance up to the pause; only silence follows it
    assert len(acts[3].audio) < len(acts[4].audio) and len(acts[1].audio) < len(acts[3].audio)
    assert not np.any(acts[4].audio[len(acts[3].audio):])
    off = Duplex(Scripted(probs), VADConfig(speculate_ms=0, echo_guard=False))
    off.start_listening()
    assert [type(a) for a in off.feed(frames(57))] == [SpeechStarted, UtteranceEnded]


def test_short_blip_never_starts_an_utterance():
    d = Duplex(Scripted([0.9] * 5 + [0.0] * 30), CFG)
    d.start_listening()
    assert d.feed(frames(35)) == [] and d.state is State.LISTENING


def _echo(audio, delay_s, gain, rng):
    d = int(delay_s * RATE)
    out = np.concatenate([np.zeros(d, np.float32), audio])[: len(audio)] * gain
    return (out + rng.normal(0, 0.002, len(out))).astype(np.float32)


@pytest.mark.parametrize("guard", [True, False])
def test_own_voice_echo_does_not_interrupt(vad, say, guard):
    """The assistant's own output fed back as mic input (delayed, attenuated)."""
    vad.reset()
    answer = say("Paris is the capital of France. It is famous for the Eiffel Tower and its museums.")
    d = Duplex(vad, VADConfig(echo_guard=guard))
    d.start_listening()
    d.thinking()
    rng = np.random.default_rng(1)
    mic = _echo(answer, 0.08, 0.5, rng)
    barged = []
    for i in range(0, len(answer), 1600):  # 100 ms of playback, then the echo of it comes in
        d.playing(answer[i:i + 1600])
        barged += [a for a in d.feed(mic[i:i + 1600]) if isinstance(a, BargeIn)]
    if guard:
        assert barged == [] and d.state is State.SPEAKING
    else:
        assert barged, "without the guard the echo interrupts: the guard is what holds"


def test_user_over_echo_barges_in_and_mm_hm_does_not(vad, say):
    vad.reset()
    answer = say("Paris is the capital of France. It is famous for the Eiffel Tower and its many museums.")
    # the user's voice is not the assistant's: the same voice 15% higher (say() at 16 kHz read as 18.4 kHz)
    user = prepare(say("Please stop talking and tell me about Berlin."), int(RATE * 1.15), RATE)
    mm = say("Mm.")[: int(0.25 * RATE)]
    rng = np.random.default_rng(2)
    onset = 3.0
    answer = np.concatenate([answer, np.zeros(int(onset * RATE) + len(user) - len(answer) + RATE, np.float32)])
    mic = _echo(answer, 0.06, 0.4, rng)
    mm_at, at = int(1.5 * RATE), int(onset * RATE)
    mic[mm_at:mm_at + len(mm)] += mm
    mic[at:at + len(user)] += user
    d = Duplex(vad, VADConfig())
    d.start_listening()
    d.thinking()
    barge, pauses = None, []
    for i in range(0, len(mic), 1600):
        d.playing(answer[i:i + 1600])
        for a in d.feed(mic[i:i + 1600]):
            if isinstance(a, BargeIn):
                barge = barge or a
            if isinstance(a, SpeechOnset):
                pauses.append(a)
    assert barge is not None, "the user's speech over the echo must interrupt"
    assert any(onset < p.t < onset + 0.3 for p in pauses)  # the audio paused soon after the onset
    # not at the "mm"; after the onset once the user is heard over the answer (the guard's bound on the
    # room's reflections, duplex.ECHO_MARGIN, holds back the user's quieter frames while the answer is loud)
    assert onset + 0.35 < barge.t < onset + 0.4 + 1.5, barge.t


def test_int16_stereo_48k_round_trip_is_faithful():
    from engine.speech.audio import resample

    a = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)
    b = resample(a, 16000, 48000)
    stereo = (np.stack([b, b], axis=1) * 32767).astype(np.int16)
    assert np.abs(prepare(stereo, 48000)[1000:15000] - a[1000:15000]).max() < 0.01
    unsigned = np.array([0, 128, 255], np.uint8)
    assert to_mono_float32(unsigned).tolist() == pytest.approx([-1.0, 0.0, 0.992], abs=0.01)
