"""Read aloud (app/read_aloud.py): what of an answer is spoken, the sentence-by-sentence stream, and
the route's edge: the page's protection, its bounds and its errors, on the running app."""
from __future__ import annotations

import numpy as np
import pytest

from app.read_aloud import MAX_STREAMS, ROUTE, sentences, speakable, spoken
from engine.events import CancelToken

TOKEN = "a-long-enough-test-token-0123456789"
LONG = "Hi. " + " ".join(f"This is sentence number {i} of a long answer." for i in range(400))


def test_speakable_leaves_out_code_meta_and_markup():
    answer = ("# Paris\nParis is the **capital** of [France](https://fr.example/x).\n\n"
              "```python\nprint('never read')\n```\n\n- It has museums & cafés: x &lt; y\n"
              "<details>hidden tags</details>\n\n*(interrupted)*\n"
              '<span class="turn-meta"><small>42 tokens · 9.1 tok/s</small></span>')
    said = speakable(answer)
    assert "print" not in said and "42 tokens" not in said and "interrupted" not in said
    assert "https" not in said and "<" not in said.replace("x < y", "")
    assert "capital" in said and "France" in said and "museums & cafés: x < y" in said and "hidden tags" in said
    assert speakable("```\nonly code, never closed") == ""
    from app.panels import turn_marks
    from engine.store import StoredTurn

    reply = StoredTurn(7, "assistant", "Hello there.", "complete", 0.0, meta={"model": "smollm2-135m"})
    assert speakable("Hello there." + turn_marks(reply, [5, 7])) == "Hello there."  # (spans inside the line)
    assert list(sentences(speakable(answer), 8))[:2] == ["Paris", "Paris is the capital of France."]


def test_the_stream_is_the_voice_sentence_by_sentence_and_stops_on_cancel():
    from engine.speech.audio import to_int16
    from engine.speech.tts import PiperTTS

    tts = PiperTTS("joe-us", variation=0.0)  # deterministic: a sentence always sounds the same
    text = "Good morning, everyone. See you soon."
    pieces = list(sentences(text, 8))
    assert pieces == ["Good morning,", "everyone.", "See you soon."]
    blocks = list(spoken(tts, text, 1.0, CancelToken(), first_chars=8))
    alone = [to_int16(np.concatenate(list(tts.synthesize(p)))).tobytes() for p in pieces]
    assert blocks == alone  # the first clause is sent on its own, before the rest is made

    cancel = CancelToken()
    stream = spoken(tts, LONG, 1.0, cancel)
    assert len(next(stream)) > 0
    cancel.cancel("stop")
    assert list(stream) == []


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The route behind the app's own edge (app/security.Edge, as app/server.build_app mounts it),
    on uvicorn, without the page: the browser tests (tests/test_browser_speech.py) use it there.
    The page's login is a cookie here: `page=ok` stands for Gradio's session check."""
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from app.read_aloud import make_read_aloud_router
    from app.security import Edge
    from engine.config import load_config
    from engine.engine import Engine
    from tests.conftest import free_port

    config = load_config("tiny", env={}, overrides={
        "data_dir": str(tmp_path_factory.mktemp("read")), "tts_backend": "piper", "auth_token": TOKEN,
        "max_prompt_chars": "20000"})
    engine = Engine(config)
    api = FastAPI()
    api.include_router(make_read_aloud_router(engine))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Edge(api, config, lambda cookies: cookies.get("page") == "ok"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    server.url, server.engine = f"http://127.0.0.1:{port}", engine
    yield server
    server.should_exit = True
    thread.join(10)
    engine.close()


def _post(srv, body, token=TOKEN, **headers):
    import httpx

    auth = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(srv.url + ROUTE, json=body, headers={**auth, **headers}, timeout=60)


def test_the_route_streams_the_answer_to_its_page_only(app_server):
    import httpx

    assert _post(app_server, {"text": "Hello."}, token=None).status_code == 401
    assert _post(app_server, {"text": "Hello."}, token="wrong-token-wrong-token-wrong").status_code == 401
    assert _post(app_server, {"text": "Hello."}, token=None, cookie="page=ok").status_code == 200  # the page's login
    refused = _post(app_server, {"text": "Hello."}, origin="https://evil.example")
    assert refused.status_code == 403 and "another site" in refused.json()["error"]["message"]

    with httpx.stream("POST", app_server.url + ROUTE, json={"text": "Hello there. Nice to meet you."},
                      headers={"authorization": f"Bearer {TOKEN}", "origin": app_server.url}, timeout=60) as res:
        assert res.status_code == 200 and res.headers["content-type"] == "audio/pcm"
        rate = int(res.headers["x-sample-rate"])
        pcm = np.frombuffer(res.read(), "<i2").astype(np.float32) / 32768
    assert rate == 22050 and 1.0 < len(pcm) / rate < 10 and np.sqrt(np.mean(pcm ** 2)) > 0.01  # speech, not silence


def test_the_route_refuses_what_it_cannot_read_clearly(app_server, monkeypatch):
    from dataclasses import replace

    from engine.config import TTSConfig
    from engine.roles import build_roles

    too_long = _post(app_server, {"text": "a" * 20_001})
    assert too_long.status_code == 413 and "at most 20,000" in too_long.json()["error"]["message"]
    huge = _post(app_server, {"text": "a" * 200_000})  # refused on its size, before it is parsed
    assert huge.status_code == 413 and "20,000 characters" in huge.json()["error"]["message"]
    code = _post(app_server, {"text": "```\nprint(1)\n```"})
    assert code.status_code == 400 and "nothing to read" in code.json()["error"]["message"]
    assert _post(app_server, {"words": "hello"}).status_code == 400
    assert _post(app_server, ["hello"]).status_code == 400

    off = replace(app_server.engine.config, tts=TTSConfig(backend="none"))
    monkeypatch.setitem(app_server.engine.roles, "tts", build_roles(off)["tts"])
    gone = _post(app_server, {"text": "Hello."})
    assert gone.status_code == 503
    assert gone.json()["error"]["message"] == ("Read aloud is unavailable: speech synthesis is off; "
                                               "set --tts-backend piper")


def test_streams_are_bounded_and_freed_when_the_listener_goes(app_server, monkeypatch):
    import time

    import httpx

    monkeypatch.setattr("app.read_aloud.LEAD_S", 0.5)  # each stream makes little more than it sends

    with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        opened = []
        for _ in range(MAX_STREAMS):
            res = client.send(client.build_request("POST", app_server.url + ROUTE, json={"text": LONG}), stream=True)
            assert res.status_code == 200
            chunks = res.iter_bytes()  # (kept: a dropped iterator closes its connection)
            assert next(chunks)  # the first sentence is here
            opened.append((res, chunks))
        busy = client.post(app_server.url + ROUTE, json={"text": "One more."})
        assert busy.status_code == 429 and "stop one first" in busy.json()["error"]["message"]
        for res, _ in opened:
            res.close()  # the listener goes: each stream's voice is cancelled and its slot freed
    deadline = time.monotonic() + 30
    while (again := _post(app_server, {"text": "One more."})).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert again.status_code == 200
