"""The server's edge as an attacker meets it: raw HTTP, forged headers, files never uploaded,
oversized and deeply nested bodies, wrong tokens, a crowd of clients (issue 11)."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from engine.events import CancelToken
from engine.queueing import FairLock, QueueFull
from tests.conftest import running_server

EVIL = "https://evil.example"


def _gradio_call(srv, data: list, headers: dict | None = None) -> str:
    """POST /gradio_api/call/respond as a script would, then read its event stream whole."""
    r = httpx.post(srv.url + "/gradio_api/call/respond", json={"data": data}, headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    with httpx.stream("GET", f"{srv.url}/gradio_api/call/respond/{event}", timeout=60) as s:
        return "".join(s.iter_text())


def test_files_never_uploaded_cannot_be_attached_through_the_gradio_api(server, tmp_path):
    from PIL import Image, ImageDraw

    secret = tmp_path / "secret.png"
    img = Image.new("RGB", (320, 80), "white")
    ImageDraw.Draw(img).text((10, 30), "TOP SECRET", fill="black")
    img.putpixel((0, 0), tuple(__import__("os").urandom(3)))  # bytes of this run only: no old copy matches
    img.save(secret)
    before = {c["id"] for c in server.engine.store.list_conversations()}
    for path in (str(secret), "/etc/passwd", str(server.engine.store.data_dir / "conversations.sqlite3")):
        stream = _gradio_call(server, [{"text": "?", "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]},
                                       None])
        assert "event: error" in stream, stream[:500]
        assert "gradio_api/file=" not in stream and "SECRET" not in stream
    # nothing was stored from it, and no copy of it was made anywhere Gradio serves from
    after = [c for c in server.engine.store.list_conversations() if c["id"] not in before]
    for conv in after:
        for turn in server.engine.store.turns(conv["id"]):
            assert "SECRET" not in json.dumps(turn.meta) and not turn.media
    import gradio.utils

    cache = gradio.utils.get_upload_folder()
    data = secret.read_bytes()
    copies = [p for p in __import__("pathlib").Path(cache).rglob("*") if p.is_file() and p.stat().st_size == len(data)
              and p.read_bytes() == data]
    assert not copies


def test_other_sites_cannot_drive_the_assistant(server):
    url = server.url
    n_media = sum(1 for p in server.engine.media_dir.rglob("*") if p.is_file())
    r = httpx.post(url + "/v1/chat/completions", content='{"messages": [{"role": "user", "content": "hi"}]}',
                   headers={"content-type": "text/plain", "origin": EVIL})
    assert r.status_code == 403 and "another site" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/edits", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64)},
                   data={"prompt": "blur"}, headers={"origin": EVIL})
    assert r.status_code == 403
    assert sum(1 for p in server.engine.media_dir.rglob("*") if p.is_file()) == n_media
    assert httpx.post(url + "/gradio_api/call/respond", json={"data": [{"text": "hi", "files": []}, None]},
                      headers={"origin": EVIL}).status_code == 403
    # a page on a rebinding domain gets nothing, not even the page config (conversation titles)
    for path in ("/v1/models", "/config", "/"):
        assert httpx.get(url + path, headers={"host": "rebind.evil.example"}).status_code == 421
    # the page itself (same origin) and scripts without an Origin still work
    same = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2}, headers={"origin": url})
    assert same.status_code == 200
    assert httpx.get(url + "/config").status_code == 200


def test_the_voice_socket_refuses_other_origins(server):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = server.url.replace("http", "ws") + "/voice/ws"
    with pytest.raises(InvalidStatus) as err:
        connect(ws_url, origin=EVIL, open_timeout=10)
    assert err.value.response.status_code == 403
    with connect(ws_url, origin=server.url, open_timeout=10) as ws:  # the page's own origin
        ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        assert json.loads(ws.recv(timeout=30))["type"] in ("error", "voice_state", "notice")


def _raw(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b'"}}' in data:
                break
    return int(data.split(b" ", 2)[1]), data


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("small"), max_new_tokens="4", max_upload_mb="1",
                        max_request_mb="2", max_queue="1") as srv:
        yield srv


def test_body_limits(small_server):
    url = small_server.url
    port = url.rsplit(":", 1)[1]
    # a declared 500 MB body: refused at once, nothing read
    status, data = _raw(url, f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 500000000\r\n\r\n")
    assert status == 413 and b"limit" in data
    # a body that does not say its size: cut off once it passes the limit
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 100_000
        yield b'"}]}'

    r = httpx.post(url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # nested 100,000 deep: a 400, not a RecursionError
    r = httpx.post(url + "/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    # an inline image over --max-upload-mb, inside a body under the request limit
    import base64

    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"0" * 1_200_000).decode()
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big}}]}]})
    assert r.status_code == 400 and "limit is 1 MB" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/models").status_code == 200  # alive


@pytest.mark.parametrize("part", [
    {"type": "input_audio", "input_audio": "UklGRg=="},
    {"type": "image_url", "image_url": {"url": 12}},
    {"type": "image_url", "image_url": {"url": "data:image/png,raw"}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "../../etc/x"}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav/../x"}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "w" * 300}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav\x00"}},
    {"type": "text", "text": {"nested": True}},
    {"type": ["list"]},
])
def test_malformed_content_parts_are_400(server, part):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("messages[0]")


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": [1]},
    {"messages": [{"role": "user", "content": "hi"}], "seed": 1.5},
    {"messages": "hi"},
])
def test_malformed_fields_are_400(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text


def test_upload_names_never_reach_a_path(server, png):
    for name in ("..", "../../x.png", "n" * 300 + ".png", "a\x00b.png"):
        r = httpx.post(server.url + "/v1/images/edits", files={"image": (name, png.read_bytes())},
                       data={"prompt": "crop it to a square"})
        assert r.status_code == 200, (name, r.text)
    r = httpx.post(server.url + "/v1/images/edits", files={"image": ("n" * 300, b"junk")}, data={"prompt": "blur"})
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 400


def test_errors_show_no_server_paths(server):
    import base64

    r = httpx.post(server.url + "/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
            b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode()}}]}]})
    assert r.status_code == 400
    text = r.json()["error"]["message"]
    assert "image-0" in text
    for leak in ("/tmp", "omni-api", str(server.engine.media_dir), str(server.engine.config.data_path)):
        assert leak not in text


def test_tokens(tmp_path):
    from engine.config import ConfigError, load_config

    for bad in ("   ", "a b"):
        with pytest.raises(ConfigError, match="blank or contain spaces"):
            load_config("tiny", overrides={"auth_token": bad}, env={})
    with pytest.raises(ConfigError, match="at least 16"):
        load_config("tiny", overrides={"host": "lan-host.local", "auth_token": "x"}, env={})
    load_config("tiny", overrides={"host": "lan-host.local", "auth_token": "auto"}, env={})
    from engine.store import Store

    token = "correct-horse-battery"
    store = Store(tmp_path)  # a conversation that exists when the server starts
    cid = store.create_conversation("private plans")
    store.close()
    with running_server(tmp_path, auth_token=token) as srv:
        for path in ("/v1/docs", "/v1/openapi.json", "/v1/status"):
            assert httpx.get(srv.url + path).status_code == 401
        ok = {"authorization": f"Bearer {token}"}
        assert httpx.get(srv.url + "/v1/openapi.json", headers=ok).status_code == 200
        # the page's login cookie opens /v1 and the voice socket too (the browser's voice mode)
        client = httpx.Client(base_url=srv.url)
        assert client.post("/login", data={"username": "me", "password": token}).status_code == 200
        assert client.get("/v1/status").status_code == 200
        from websockets.sync.client import connect

        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        with connect(srv.url.replace("http", "ws") + "/voice/ws", additional_headers={"cookie": cookie},
                     open_timeout=10) as ws:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert json.loads(ws.recv(timeout=30))["type"]
        client.close()
        # nothing user-specific in the page an unauthenticated visitor gets
        page = httpx.get(srv.url + "/").text + httpx.get(srv.url + "/config").text
        assert cid not in page and "private plans" not in page
        # wrong guesses: a few are free, then the guesser waits; the right token never does
        codes = [httpx.get(srv.url + "/v1/models", headers={"authorization": f"Bearer guess{i}"}).status_code
                 for i in range(8)]
        assert codes[:5] == [401] * 5 and 429 in codes[5:]
        r = httpx.get(srv.url + "/v1/models", headers={"authorization": "Bearer guess-again"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert httpx.get(srv.url + "/v1/models", headers=ok).status_code == 200


def test_fifty_wrong_guesses_never_lock_out_the_right_credential(tmp_path):
    """From the same address as the guesser: the API's token, the voice socket's token and the
    page's password are each served at once after 50 wrong guesses on that surface."""
    from websockets.sync.client import connect

    token = "correct-horse-battery"
    with running_server(tmp_path, auth_token=token) as srv:
        ws_url = srv.url.replace("http", "ws") + "/voice/ws"
        for i in range(50):
            assert httpx.get(srv.url + "/v1/models", headers={"authorization": f"Bearer no{i}"}).status_code in (401, 429)
        assert httpx.get(srv.url + "/v1/models", headers={"authorization": f"Bearer {token}"}).status_code == 200
        for i in range(50):
            with pytest.raises(Exception):
                connect(f"{ws_url}?token=no{i}", open_timeout=10).close()
        with connect(f"{ws_url}?token={token}", open_timeout=10) as ws:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert json.loads(ws.recv(timeout=30))["type"]
        for i in range(50):
            r = httpx.post(srv.url + "/login", data={"username": "me", "password": f"no{i}"})
            assert r.status_code in (400, 401, 429)
        assert r.status_code == 429  # the guesser is backing off
        client = httpx.Client(base_url=srv.url)
        assert client.post("/login", data={"username": "me", "password": token}).status_code == 200
        assert client.get("/v1/status").status_code == 200  # its cookie works
        # the page posts its login as multipart form data: read the same way
        client = httpx.Client(base_url=srv.url)
        r = client.post("/login", files={"username": (None, "me"), "password": (None, token)})
        assert r.status_code == 200 and client.get("/v1/status").status_code == 200
        # a wrong one in multipart is read and counted as well: refused, and the next one waits
        # (the first may land after the back-off ran out, on a slow machine: then it is a plain 400)
        wrong = {"username": (None, "me"), "password": (None, "wrong")}
        assert httpx.post(srv.url + "/login", files=wrong).status_code in (400, 429)
        assert httpx.post(srv.url + "/login", files=wrong).status_code == 429


def test_behind_a_trusted_proxy_each_client_backs_off_on_its_own(tmp_path):
    token = "correct-horse-battery"
    with running_server(tmp_path, auth_token=token, trusted_proxy="127.0.0.1") as srv:
        def get(client: str, given: str) -> int:
            headers = {"authorization": f"Bearer {given}", "x-forwarded-for": f"6.6.6.6, {client}"}
            return httpx.get(srv.url + "/v1/models", headers=headers).status_code

        assert 429 in [get("203.0.113.9", f"no{i}") for i in range(8)]
        assert get("198.51.100.7", "wrong") == 401  # another client behind the proxy: its own count
        assert get("203.0.113.9", token) == 200
    from app.security import Edge
    from engine.config import load_config

    edge = Edge(None, load_config("tiny", overrides={"trusted_proxy": "10.0.0.1,10.0.0.2"}, env={}))
    assert edge.client("10.0.0.1", "1.2.3.4, 5.6.7.8, 10.0.0.2") == "5.6.7.8"  # (1.2.3.4: the client's own claim)
    assert edge.client("9.9.9.9", "5.6.7.8") == "9.9.9.9"  # not a trusted proxy: the header is not believed


def test_lockout_backs_off_and_forgets_after_a_quiet_spell():
    from app.security import Lockout

    now = [0.0]
    lock = Lockout(clock=lambda: now[0])
    for _ in range(Lockout.FREE_TRIES):
        assert lock.retry_after("a") == 0
        lock.failed("a")
    lock.failed("a")
    assert lock.retry_after("a") == 1 and lock.retry_after("b") == 0
    lock.failed("a")
    assert lock.retry_after("a") == 2
    now[0] += 2
    assert lock.retry_after("a") == 0
    now[0] += Lockout.MAX_S + 1  # a quiet spell: forgotten
    lock.failed("a")
    assert lock.retry_after("a") == 0


def test_fair_lock_serves_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    threads = []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        while lock.waiting < i + 1:
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == list(range(6))


def test_fair_lock_refuses_beyond_its_depth_and_lets_a_cancelled_waiter_go():
    lock = FairLock(max_waiting=1)
    lock.acquire()
    token = CancelToken()
    got = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(cancelled=lambda: token.cancelled)))
    t.start()
    while lock.waiting < 1:
        time.sleep(0.001)
    with pytest.raises(QueueFull):
        lock.acquire(refuse_when_full=True)
    token.cancel()
    t.join(5)
    assert got == [False] and lock.waiting == 0
    lock.release()
    assert lock.acquire(refuse_when_full=True)


def test_a_full_queue_is_429_and_status_shows_it(small_server):
    """Every slot of the model's batch taken (constrained-decoding sequences that hold theirs),
    one request waiting (max_queue 1): the next is a 429, and /v1/status says so."""
    small_server.engine.llm()  # (loaded: its scheduler is the queue)
    url, lock = small_server.url, small_server.engine.model_queue
    holds = [lock.open([5, 6, 7]) for _ in range(lock.capacity)]  # the model is busy
    for hold in holds:
        hold.logits()
    try:
        waiter = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        waiter.start()
        deadline = time.monotonic() + 30
        while lock.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(url + "/v1/status").json()["queue"] == {"waiting": 1, "busy": True, "max_waiting": 1}
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and "busy" in r.json()["error"]["message"] and r.headers["retry-after"]
        # the queue filling between the API's look and the engine's: still a 429, not a 503
        lock.full = lambda: False
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429, r.text
    finally:
        del lock.full
        for hold in holds:
            hold.close()
    waiter.join(60)
    assert httpx.get(url + "/v1/status").json()["queue"]["waiting"] == 0
