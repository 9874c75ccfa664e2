"""The `remote` profile against a real OpenAI-compatible server, not a mock: this app itself
(tiny profile, with a bearer token) started as the upstream on another port, and llama.cpp's
server when it is installed. A client talks to the downstream app, which asks the upstream."""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager

import openai
import pytest

from engine.config import load_config
from engine.engine import Engine
from tests.conftest import free_port, running_server

TOKEN = "upstream-test-token-0123"
QUIET = {"asr_backend": "none", "tts_backend": "none", "vad.backend": "none"}


@contextmanager
def remote_app(data_dir, api_base: str, **overrides):
    """This app on the remote profile, its LLM at `api_base`."""
    from app.server import Server

    fields = {"data_dir": str(data_dir), "port": str(free_port()), "api_base": api_base, **QUIET, **overrides}
    engine = Engine(load_config("remote", overrides=fields, env={}))
    server = Server(engine).start()
    try:
        yield server
    finally:
        server.close()
        engine.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("upstream"), auth_token=TOKEN, max_new_tokens="64",
                        context_tokens="4096") as srv:
        yield srv


@pytest.fixture(scope="module")
def downstream(upstream, tmp_path_factory):
    with remote_app(tmp_path_factory.mktemp("downstream"), upstream.url + "/v1", api_key=TOKEN) as srv:
        yield srv


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_remote_profile_answers_through_the_upstream(upstream, downstream, answers):
    client = _client(downstream)
    seen = answers(upstream.engine)
    r = client.chat.completions.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content and seen  # the upstream did the work
    stream = client.chat.completions.create(model="tiny", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    llm = client.get("/status", cast_to=object)["roles"]["llm"]
    assert llm["state"] == "ready" and f"tiny @ {upstream.url}/v1" in llm["detail"]  # found by asking the upstream
    client.close()


def test_a_stop_downstream_stops_the_upstream(upstream, downstream, answers):
    seen = answers(upstream.engine)
    client = _client(downstream)
    stream = client.chat.completions.create(model="tiny", max_tokens=3000, stream=True,
                                            messages=[{"role": "user", "content": "go on"}])
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while (upstream.engine.model_queue.locked() or not seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[-1]["finish_reason"] == "cancelled"
    assert seen[-1]["completion_tokens"] < 3000
    client.close()


def test_wrong_upstream_token_is_said_not_crashed(upstream, tmp_path):
    with remote_app(tmp_path, upstream.url + "/v1", api_key="not-the-token") as srv:
        client = _client(srv)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503 and "401" in str(err.value)
        client.close()


def _llama_server(gguf: str, port: int) -> list[str] | None:
    """The command of llama.cpp's OpenAI-compatible server: its `llama-server` binary, or
    llama-cpp-python's `python -m llama_cpp.server` (the [server] extra); None when neither is here."""
    import importlib.util
    import sys

    if shutil.which("llama-server"):
        return ["llama-server", "-m", gguf, "--host", "127.0.0.1", "--port", str(port)]
    if all(importlib.util.find_spec(m) for m in ("llama_cpp", "sse_starlette", "starlette_context")):
        return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port)]
    return None


@pytest.mark.skipif(_llama_server("x", 0) is None, reason="llama.cpp's server (llama-server or "
                    "llama-cpp-python[server]) is not installed")
def test_llama_cpp_server_as_upstream(tmp_path):  # pragma: no cover - needs llama.cpp
    import subprocess

    from engine.packaged import resolve_named

    port = free_port()
    proc = subprocess.Popen(_llama_server(str(resolve_named("llm", "smollm2-135m")), port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:  # the model loads before the server answers; the remote profile asks it once
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "llama.cpp's server did not start"
            time.sleep(1)
        with remote_app(tmp_path, f"http://127.0.0.1:{port}/v1") as srv:
            client = _client(srv)
            r = client.chat.completions.create(model="x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
