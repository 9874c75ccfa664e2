"""A short soak (bench/soak.py, issue 25 item 3): the server as a child process on the tiny model with
the real packaged speech roles, six clients at once for a few seconds over every kind of traffic
(streamed chat, tool calls, transcriptions, streamed Responses turns, one realtime voice session).
Every answer must be complete and nothing may fail but a documented 429; the server must still be
serving at the end. RSS and timings are reported by the bench, not asserted: on the tiny model they
are noise (the long run on the real model is `python bench/soak.py`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)


def _soak():
    """bench/soak.py as a module (bench/ is not a package; nothing is put on sys.path before it)."""
    spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_answers_everything_completely(tmp_path, tiny_cli):
    soak = _soak()
    data = tmp_path / "data"
    flags = tiny_cli(data) + ["--context-tokens", "4096", "--max-new-tokens", "16"]
    result = soak.run_soak(clients=6, seconds=10, profile="tiny", data_dir=data, seed=3, log=print,
                           server_args=flags, idle_s=1.0)
    kinds = result["kinds"]
    assert set(kinds) == set(soak.KINDS)
    for kind, row in kinds.items():
        assert row["errors"] == 0, (kind, row["error_samples"])
        assert row["complete"] >= 1, (kind, row)  # every kind was served, not just tried
        assert row["complete"] + row["busy_429"] == row["requests"], (kind, row)
    assert result["totals"]["complete"] >= 10
    assert result["server_alive"] and result["clients_still_running"] == 0
    assert result["server_log_tracebacks"] == 0
    assert result["rss_mb"]["start"] > 0 and result["rss_mb"]["peak"] >= result["rss_mb"]["start"]


def test_a_stream_the_full_queue_refuses_is_a_429_not_a_busy_stream(tmp_path):
    """What the soak found at saturation: a streamed request passes the API's look at the queue, the
    queue fills before the engine submits it, and the client got a 200 whose stream said "busy". The
    documented answer is a 429 (which clients back off and retry on), streamed or not."""
    import threading
    import time

    import httpx

    from tests.conftest import running_server

    with running_server(tmp_path / "data", max_new_tokens="4", max_queue="1") as srv:
        srv.engine.llm()
        queue = srv.engine.model_queue
        holds = [queue.open([5, 6, 7]) for _ in range(queue.capacity)]  # every slot taken
        for hold in holds:
            hold.logits()
        ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        waiter = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/chat/completions", json=ask, timeout=60))
        waiter.start()
        try:
            deadline = time.monotonic() + 30
            while queue.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            queue.full = lambda: False  # the API's look says there is room; the engine's says full
            for route, body in (("/v1/chat/completions", {**ask, "stream": True}),
                                ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
                                ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "stream": True})):
                r = httpx.post(srv.url + route, json=body, timeout=60)
                assert r.status_code == 429, (route, r.status_code, r.text[:300])
                assert "busy" in r.json()["error"]["message"] and r.headers["retry-after"]
        finally:
            del queue.full
            for hold in holds:
                hold.close()
            waiter.join(60)
        # and once there is room, the same streams are served
        r = httpx.post(srv.url + "/v1/chat/completions", json={**ask, "stream": True}, timeout=60)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
