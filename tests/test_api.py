"""The OpenAI-compatible API, driven by the official openai client."""
from __future__ import annotations

import time

import httpx
import openai
import pytest


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_non_streaming(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streaming_sse(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) >= 3  # role chunk, deltas, final


def test_inline_images_are_looked_at(client, png):
    import base64

    def ask(url):
        return client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}])

    plain = client.chat.completions.create(model="tiny", max_tokens=4,
                                           messages=[{"role": "user", "content": "what is this"}])
    seen = ask("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode())
    assert not seen.choices[0].message.content.startswith("(I couldn't")
    assert seen.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the perception facts went in
    with pytest.raises(openai.BadRequestError, match="image-0: unsupported file type"):
        ask("data:image/png;base64,AAAA")  # a file that cannot be read is the request's 400
    with pytest.raises(openai.BadRequestError, match="data: URLs"):
        ask("https://example.com/cat.png")


def test_bad_requests_are_400_with_a_message(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "non-empty" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400


def test_client_disconnect_cancels_generation(server, client, answers):
    seen = answers(server.engine)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}],
                                            max_tokens=4000, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while (server.engine.model_queue.locked() or not seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    usage = seen[-1]
    assert usage["finish_reason"] == "cancelled"
    assert usage["completion_tokens"] < 4000
    # and the server is free for the next request
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content


def test_auth_token_is_required_when_set(tmp_path):
    from tests.conftest import running_server

    with running_server(tmp_path, auth_token="s3cret") as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        ok.close()


def test_image_generation_and_edit_endpoints(server, client, png):
    """The openai client's images API over the same generators (tiny diffusion; OpenCV edits)."""
    import base64
    import io

    from PIL import Image

    out = client.images.generate(prompt="a lighthouse at dusk", size="64x64", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (64, 64)
    with open(png, "rb") as f:
        out = client.images.edit(image=f, prompt="crop it to a square")
    w, h = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size
    assert w == h == 48
    with pytest.raises(openai.BadRequestError, match="between 64 and 2048"):
        client.images.generate(prompt="huge", size="9000x9000", response_format="b64_json")
    r = httpx.post(server.url + "/v1/images/edits", files={"image": ("x.png", b"not an image")},
                   data={"prompt": "blur"})
    assert r.status_code == 400 and "not a valid PNG" in r.json()["error"]["message"]


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("/v1/images/generations", {"prompt": "a boat", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "a boat", "n": 3}, "n"),
    ("/v1/audio/speech", {"input": "hello", "speed": 9}, "speed"),
])
def test_a_malformed_body_is_a_400_naming_the_field(server, path, body, field):
    """Every /v1 body is a typed model: a bad field is OpenAI's 400 with the field as `param`
    and in the message (their clients show the message)."""
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}: ") and err["type"] == "invalid_request_error"
