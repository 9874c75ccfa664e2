"""The API decodes a request whose inline media got perception facts at llm.facts_temperature,
unless the request set a temperature (the session's side: tests/test_session.py)."""
from __future__ import annotations

import base64

from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.config import load_config
from engine.engine import Engine


def test_api_request_with_inline_image_is_decoded_at_the_facts_temperature(tmp_path, png):
    from app.api import make_router

    cfg = load_config("tiny", overrides={"data_dir": str(tmp_path / "data"), "temperature": "0.7"}, env={})
    eng = Engine(cfg)
    llm, seen = eng.llm(), []
    real = llm.generate

    def spy(messages, media=(), params=None, cancel=None):
        seen.append(params.temperature)
        return (yield from real(messages, media, params, cancel))

    llm.generate = spy
    app = FastAPI()
    app.include_router(make_router(eng))
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}
    try:
        with TestClient(app) as client:
            for content, extra in (([{"type": "text", "text": "what is this"}, image], {}), ("what is this", {}),
                                   ([{"type": "text", "text": "what is this"}, image], {"temperature": 0.5})):
                body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
    finally:
        eng.close()
    assert seen == [0.0, 0.7, 0.5]
