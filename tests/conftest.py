"""Shared fixtures: the tiny profile (seeded random model, no files), a data
dir per test, sample media made in code, and the app served on 127.0.0.1."""
from __future__ import annotations

import os

# The suite never downloads (the app reads hub ids from the local cache only; this machine
# has no network). Said to huggingface_hub before anything imports it (it reads this once):
# without it a hub id that is not cached, such as a test's "no/such-model", is looked up
# online with five retries and backoff, ~23 s per file, before it fails as it fails offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def _link_or_copy(src, dst):
    """Big files (weights, codes, the kernel) as hard links: no copy, one page cache; the
    engine replaces its cache files (write to a temp name, os.replace), never edits them in
    place, so a test cannot change the shared one. Small files (markers, JSON) are copied."""
    import shutil

    if os.path.getsize(src) > 1 << 20:
        try:
            return os.link(src, dst)
        except OSError:  # another filesystem
            pass
    return shutil.copy2(src, dst)


def seed_models(cache, data_dir):
    """Give a data dir the model cache (`data_dir/models`) a first start left in `cache`, as a
    user's second start finds it: what the first start writes is checked where it is made."""
    import shutil
    from pathlib import Path

    if Path(cache).is_dir():  # (absent when nothing was made: no kernel without a C compiler)
        shutil.copytree(cache, Path(data_dir) / "models", copy_function=_link_or_copy, dirs_exist_ok=True)
    return Path(data_dir)


# Work that every session of the slow tests repeats in the same way, run in child processes that
# start with the session, at the lowest priority (threads they make inherit it): they take the
# CPU the tests leave idle (the suite is mostly one Python thread on 2 cores), and are done, or
# nearly, when the first test that needs one asks for it. Each gets a data dir as argv[1].
_BACKGROUND = {
    # One cold start of the cpu profile's model, as `run_app.py --profile cpu` makes it on a new
    # machine: the GGUF joined from its parts and hash-checked, its tokenizer converted, its int8
    # codes found, the kernel compiled (~90 s of one core).
    "cpu_model_cache": """
import os, sys
os.nice(19)
from engine.config import load_config
from engine.engine import Engine
eng = Engine(load_config("cpu", overrides={"data_dir": sys.argv[1]}, env={}))
try:
    eng.llm()
finally:
    eng.close()
""",
    # transformers' own conversion of the lighter model's GGUF (dequantized, saved as safetensors),
    # made as `TransformersBackend.model` makes it on first use (~40 s of one core).
    "smol_converted": """
import os, sys
from pathlib import Path
os.nice(19)
from engine.llm.loading import converted_dir
from engine.llm.sources import resolve
models = Path(sys.argv[1]) / "models"
converted_dir(resolve("smollm2-135m", models), models)
""",
}


def _start_background(tmp_path_factory, name: str):
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path_factory.mktemp(name)
    with open(data / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _BACKGROUND[name], str(data)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    return data, proc


def _renice(pid: int, value: int) -> None:
    """Every thread of `pid` and of its children (a first start converts the model in a child
    process: engine/llm/loading.py), where allowed (Linux priorities are per thread)."""
    import psutil

    try:
        pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:  # it just ended
        return
    for each in pids:
        try:
            for tid in os.listdir(f"/proc/{each}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except OSError:  # not permitted, or it just ended: it goes on as it was
            pass


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory):
    """The jobs of _BACKGROUND that a selected test needs, started with the session."""
    wanted = sorted({name for item in request.session.items for name in getattr(item, "fixturenames", ())
                     if name in _BACKGROUND})
    jobs = {name: _start_background(tmp_path_factory, name) for name in wanted}
    yield jobs
    for _, proc in jobs.values():
        if proc.poll() is None:  # (the session ended before a test waited for it)
            proc.kill()
        proc.wait()


def _finished(jobs: dict, name: str, tmp_path_factory):
    """The data dir of background job `name` once it has finished (started here if it was not)."""
    data, proc = jobs.get(name) or _start_background(tmp_path_factory, name)
    if proc.poll() is None:  # still at it, and a test waits for it: a normal priority again
        _renice(proc.pid, 0)
    proc.wait()
    assert proc.returncode == 0, (data / "log").read_text()[-3000:]
    return data


@pytest.fixture(scope="session")
def cpu_model_cache(_background, tmp_path_factory):
    """The cpu profile model's cache (`data_dir/models`) after its one cold start, made once per
    session (above). Tests that run that model start from a copy of it (`seed_models`) instead
    of repeating the cold start in each data dir; what the cold start wrote is what they check."""
    return _finished(_background, "cpu_model_cache", tmp_path_factory) / "models"


@pytest.fixture(scope="session")
def smol_converted(_background, tmp_path_factory):
    """A models folder holding only transformers' conversion of the lighter model's GGUF, made
    once per session (above): `seed_models` it into a data dir, and that engine's
    `llm.model` loads it instead of converting again."""
    models = _finished(_background, "smol_converted", tmp_path_factory) / "models"
    only = models.parent / "converted"  # (the job also joined the GGUF there: leave that out)
    if not only.exists():
        (ready,) = [p.parent for p in models.glob("*/READY")]
        only.mkdir()
        ready.rename(only / ready.name)
    return only


@pytest.fixture(scope="session")
def tiny_cli(tmp_path_factory):
    """tiny_cli(data_dir) -> the `run_app.py` flags for a child process (the CLI, the app) on the
    tiny model: `--data-dir data_dir --llm FOLDER`, FOLDER being --profile tiny's own model (same
    seed, same weights) saved once as a checkpoint folder, as a converted model is. A child loads
    it the way it loads a real model's folder (engine/llm/lean.py: tokenizers and the fast path,
    no transformers import: ~5 s less per process on 2 cores), from its int8 codes found at the
    first start, here; the data dir gets the int8 kernel that start compiled (~3 s of gcc)."""
    from engine.llm.kernels import q8
    from engine.llm.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-cli")
    folder = save_tiny_checkpoint(root / "tiny")
    # (this process may hold a kernel built elsewhere already: build it where the children look)
    q8.build(root / "data" / "models" / "kernels")
    eng = Engine(load_config("tiny", overrides={"data_dir": str(root / "data"), "llm": str(folder)}, env={}))
    try:
        eng.llm()  # the first start: its int8 codes are kept in the folder
    finally:
        eng.close()

    def flags(data_dir) -> list[str]:
        seed_models(root / "data" / "models", data_dir)
        return ["--data-dir", str(data_dir), "--llm", str(folder)]

    return flags


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
