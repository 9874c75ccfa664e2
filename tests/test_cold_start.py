"""A first start's one-time conversions run in a child process (engine/llm/conversion.py
`convert_in_child`): the server then reads the files the child wrote, as a warm start does,
so the memory the conversion used leaves with the child (bench/cold_start.py). What it
computes is what converting in-process computed; what fails there fails here the same way."""
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.llm.transformers_backend as backend_module
from engine.config import load_config
from engine.errors import Unavailable
from engine.llm.conversion import described, rebuilt
from engine.llm.kernels import q8
from engine.llm.tiny import save_tiny_checkpoint
from engine.llm.transformers_backend import TransformersBackend
from tests.test_fastpath import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder holding the int8 kernel already (the children find it: no gcc per test)."""
    folder = tmp_path_factory.mktemp("models")
    assert q8.build(folder / "kernels") is not None, q8.reason()
    return folder


@pytest.fixture
def children(monkeypatch):
    """The conversions the backend hands to a child process, as (config, cache dir)."""
    seen, real = [], backend_module.convert_in_child

    def spy(cfg, cache_dir):
        seen.append((cfg, cache_dir))
        return real(cfg, cache_dir)

    monkeypatch.setattr(backend_module, "convert_in_child", spy)
    return seen


def tiny_llm(folder: Path):
    return load_config("tiny", overrides={"llm.model": str(folder)}, env={}).llm


def codes_of(fast) -> list[dict]:
    layers = [layer.q8[name].state() for layer in fast.layers for name in ("qkv", "o", "gate_up", "down")]
    return layers + [fast.q8_head.state()]


def test_the_codes_are_made_in_a_child_and_equal_those_made_here(tmp_path, models, children, monkeypatch):
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    with monkeypatch.context() as m:  # coding a weight in this process would fail the load
        m.setattr(q8.Q8Linear, "_quantize", lambda *a: pytest.fail("the codes were made in the server's process"))
        cold = TransformersBackend(tiny_llm(folder), models)
        assert [c[1] for c in children] == [models] and len(list(folder.glob("int8-codes-*.pt"))) == 1
        warm = TransformersBackend(tiny_llm(folder), models)  # (the files are there: no child)
        assert len(children) == 1
    # the same checkpoint converted in this process, as every first start did before
    here = TransformersBackend(tiny_llm(save_tiny_checkpoint(tmp_path / "again")), models, convert_here=True)
    assert len(children) == 1
    for got, want in zip(codes_of(cold.fast), codes_of(here.fast), strict=True):
        assert got["bits"] == want["bits"]
        assert all(torch.equal(got[k], want[k]) for k in ("q", "scale", "low"))
    msgs = [{"role": "user", "content": "Hello there."}]
    assert run(cold, msgs)[0] == run(warm, msgs)[0] == run(here, msgs)[0]
    for b in (cold, warm, here):
        b.close()


def test_a_corrupt_gguf_fails_in_the_child_as_it_failed_here(tmp_path, models, children):
    """Its conversion (transformers', the file being no GGUF the blocks reader takes) fails in
    the child; the server raises the same error, type and message, as converting here did."""
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(4096))
    errors = []
    for here in (True, False):
        with pytest.raises(Exception) as info:
            TransformersBackend(tiny_llm(bad), tmp_path / f"models-{here}", convert_here=here)
        errors.append(info.value)
    assert len(children) == 1  # (the second went to a child)
    assert type(errors[1]) is type(errors[0]) and str(errors[1]) == str(errors[0])
    assert "model.gguf" in str(errors[1])
    assert not list(tmp_path.glob("models-False/*/READY"))  # nothing half-made is taken for done


@pytest.mark.parametrize("exc", [
    Unavailable("joined file has sha256 0123456789ab..., expected 1d9614638d18...", "reinstall the part packages"),
    OSError(errno.ENOSPC, "No space left on device", "/data/models/x.gguf.part"),
    OSError(errno.EXDEV, "Invalid cross-device link", "a.tmp", None, "b"),
    ValueError("x.gguf is GGUF v99; this reader handles v2 and v3."),
    KeyError("token_embd.weight"),
], ids=["unavailable", "disk-full", "two-paths", "value", "key"])
def test_errors_cross_from_the_child_unchanged(exc):
    """What the child reports (`described`, one JSON line) is raised in the server as the
    same exception: its type, message and, for Unavailable, what to set."""
    again = rebuilt(json.loads(json.dumps(described(exc))))
    assert type(again) is type(exc) and str(again) == str(exc)
    if isinstance(exc, OSError):
        assert again.errno == exc.errno and again.filename == exc.filename
    if isinstance(exc, Unavailable):
        assert (again.why, again.what_to_set) == (exc.why, exc.what_to_set)


def test_killing_the_server_mid_conversion_leaves_nothing_half_made(tmp_path, models):
    """The server killed while its child converts: the child sees it and ends at once, before
    it writes anything a later start would read (the files are written under temporary names
    and renamed when whole, so a child killed itself could leave none half-made either)."""
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    code = ("from engine.config import load_config; from engine.llm import load_backend; load_backend("
            f"load_config('tiny', overrides={{'llm.model': {str(folder)!r}}}, env={{}}).llm, {str(models)!r})")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        child, end = None, time.monotonic() + 120
        while child is None and time.monotonic() < end and server.poll() is None:
            child = _conversion_child(server.pid)
            time.sleep(0.05)
        assert child is not None, "no conversion child was started"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        end = time.monotonic() + 30
        while _alive(child) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(child)  # it ended by itself
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert not list(folder.glob("int8-codes-*"))  # (it was killed among its imports: it made nothing)


def _conversion_child(pid: int):
    import psutil

    try:
        return next((p for p in psutil.Process(pid).children() if "conversion import child" in " ".join(p.cmdline())),
                    None)
    except psutil.Error:  # (one ended while listed)
        return None


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # (a zombie has ended; its new parent reaps it)
    except psutil.NoSuchProcess:
        return False
