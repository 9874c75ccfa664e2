"""Shared fixtures: the tiny profile (seeded random model, no files), a data
dir per test, sample media made in code, and the app served on 127.0.0.1."""
from __future__ import annotations

import socket
import wave
from contextlib import contextmanager

import numpy as np
import pytest

from engine.config import load_config
from engine.engine import Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path):
    return load_config("tiny", overrides={"data_dir": str(tmp_path / "data")}, env={})


@pytest.fixture
def engine(config):
    eng = Engine(config)
    yield eng
    eng.close()


def start_server(data_dir, **overrides):
    """The whole app (UI + API) on a free loopback port, tiny profile."""
    from app.server import Server

    fields = {"data_dir": str(data_dir), "port": str(free_port()), **overrides}
    eng = Engine(load_config("tiny", overrides=fields, env={}))
    eng.start_loading().join()
    return Server(eng).start()


@contextmanager
def running_server(data_dir, **overrides):
    srv = start_server(data_dir, **overrides)
    try:
        yield srv
    finally:
        srv.close()
        srv.engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server"), max_new_tokens="32", context_tokens="4096") as srv:
        yield srv


def endless_checkpoint(folder):
    """The tiny seeded model saved as a checkpoint folder whose generation config suppresses
    every token the engine stops on (generation_config.json "suppress_tokens", which the
    sampler honours for any model): its answers end only at max_new_tokens or on Stop,
    whatever the decode path, thread or float reduction order."""
    from engine.llm.decoding import stop_ids
    from engine.llm.tiny import build_tiny_model, save_tiny_checkpoint

    model, tokenizer = build_tiny_model()
    model.generation_config.suppress_tokens = sorted(stop_ids(model, tokenizer))
    return save_tiny_checkpoint(folder, model, tokenizer)


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """Every answer runs to 3000 tokens (the model cannot end it) so Stop can land mid-answer."""
    folder = tmp_path_factory.mktemp("long")
    with running_server(folder / "data", llm=str(endless_checkpoint(folder / "endless")),
                        max_new_tokens="3000", context_tokens="4096") as srv:
        yield srv


@pytest.fixture
def answers(monkeypatch):
    """answers(engine) -> a list that gets each answer's usage and timings as `engine.answer`
    returns them (an answer's figures travel in its own events; this is how a test sees those
    of a turn it does not read, such as an API request's on the server side)."""
    def watch(engine) -> list[dict]:
        seen, real = [], engine.answer

        def answer(*args, **kwargs):
            text, usage, timings = yield from real(*args, **kwargs)
            seen.append({**usage, **timings})
            return text, usage, timings

        monkeypatch.setattr(engine, "answer", answer)
        return seen

    return watch


@pytest.fixture
def prompts(monkeypatch):
    """prompts(engine) -> a list that gets each prompt `engine.answer` is given, as
    (messages, params): what the model was told, seen from outside."""
    def watch(engine) -> list[tuple]:
        asked, real = [], engine.answer

        def answer(messages, params, *args, **kwargs):
            asked.append((list(messages), params))
            return (yield from real(messages, params, *args, **kwargs))

        monkeypatch.setattr(engine, "answer", answer)
        return asked

    return watch


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "voice.wav"
    t = np.arange(16000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture
def mp4(tmp_path):
    import cv2

    path = tmp_path / "clip.mp4"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(20):
        out.write(np.full((48, 64, 3), i * 10, np.uint8))
    out.release()
    return path


@pytest.fixture(scope="session")
def say():
    """Real speech from the packaged Piper voice, deterministic (no sampling noise) so
    tests do not flake: say(text, rate=16000) -> mono float32."""
    from engine.speech.audio import prepare
    from engine.speech.tts import PiperTTS

    voice = PiperTTS("joe-us", variation=0.0)
    cache: dict = {}

    def _say(text: str, rate: int = 16000) -> np.ndarray:
        if (text, rate) not in cache:
            audio = np.concatenate(list(voice.synthesize(text)) or [np.zeros(0, np.float32)])
            cache[(text, rate)] = prepare(audio, voice.sample_rate, rate)
        return cache[(text, rate)].copy()

    return _say


def concurrently(fn, items, timeout: float = 120) -> list:
    """fn(item) for every item, each on its own thread, all at once; the results in order."""
    import threading

    out: list = [None] * len(items)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(items[i]))) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out
