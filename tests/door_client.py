"""The hostile client of tests/doors.py: one running server's every door (HTTP routes, the
realtime and voice sockets, the page's Gradio events), each answer read as an `Answer`."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import httpx

if TYPE_CHECKING:
    from payloads import Payload


@dataclass
class Answer:
    status: int  # HTTP status; sockets and the page map theirs: 200 served, 400 refused with a message, 500 broke
    message: str = ""  # the refusal's text (a 4xx) or what broke
    text: str = ""  # the start of a 2xx answer


class Client:
    """One hostile client of a running server (HTTP, its two sockets and the page)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60)
        self.sockets: dict[str, object] = {}

    def close(self) -> None:
        for ws in self.sockets.values():
            ws.close()
        self.http.close()

    def answer(self, r: httpx.Response, streamed: bool = True) -> Answer:
        if r.status_code >= 400:
            raw = r.read().decode("utf-8", "replace")
            try:
                doc = json.loads(raw)
                err = doc.get("error") if isinstance(doc, dict) else None
                msg = err.get("message") if isinstance(err, dict) else (doc.get("detail") if isinstance(doc, dict) else raw)
            except ValueError:
                msg = raw
            return Answer(r.status_code, str(msg))
        try:  # the first block of a 2xx: it answers (the rest, a stream of tokens or audio, is cancelled by closing)
            got = next(r.iter_bytes(), b"")
        except httpx.ReadTimeout:
            return Answer(r.status_code, "", "(nothing within the read timeout: a slow stream)")
        return Answer(r.status_code, "", got[:4000].decode("utf-8", "replace"))

    def post(self, path: str, content: bytes, stream_mb: int = 0, **kw) -> Answer:
        if stream_mb:
            return self.endless(path, content, stream_mb)
        with self.http.stream("POST", path, content=content, headers={"content-type": "application/json"},
                              **kw) as r:
            return self.answer(r)

    def endless(self, path: str, head: bytes, mb: int) -> Answer:
        """A chunked body without a length: the JSON, then whitespace for `mb` MB (unless the server
        answers first); the edge must cut it off with a 413."""
        import re
        import socket
        from urllib.parse import urlsplit

        where = urlsplit(self.url)
        with socket.create_connection((where.hostname, where.port), timeout=60) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (len(head), head))
            block = b"%x\r\n" % 1_000_000 + b" " * 1_000_000 + b"\r\n"
            try:
                for _ in range(mb):
                    s.sendall(block)
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # it stopped reading: its answer is waiting
            got = b""
            while len(got) < 65536 and (more := s.recv(65536)):
                got += more
                if b"\r\n\r\n" in got and (b"}" in got.split(b"\r\n\r\n", 1)[1]):
                    break
        status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/") else 599
        said = re.search(rb'"message": ?"((?:[^"\\]|\\.)*)"', got)
        return Answer(status, said.group(1).decode("utf-8", "replace") if said else got[:300].decode("latin-1"))

    def form(self, path: str, files: dict, data: dict) -> Answer:
        with self.http.stream("POST", path, files=files, data=data) as r:
            return self.answer(r)

    # --- sockets ---

    def realtime(self, key: str, manual: bool = False):
        """This row's realtime connection (kept across payloads; a new one after the server closed it)."""
        from websockets.sync.client import connect

        ws = self.sockets.get(key)
        if ws is None:
            ws = connect(self.url.replace("http", "ws", 1) + "/v1/realtime", max_size=None, open_timeout=60)
            first = json.loads(ws.recv(timeout=60))
            assert first["type"] == "session.created", first
            if manual:
                ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None,
                                                                           "modalities": ["text"]}}))
                until(ws, lambda e: e["type"] == "session.updated")
            self.sockets[key] = ws
        return ws

    def realtime_send(self, key: str, frames: list[str], wait_for: str = "input_audio_buffer.cleared",
                      manual: bool = False, timeout: float = 60) -> Answer:
        """Send the frames, then a clear probe (or wait for `wait_for`, a response's end): an error
        event is a 400 with its message (one answering the frame whose event_id is "last" ends the
        wait); a socket the server closed, or no answer in time, is a 500."""
        from websockets.exceptions import ConnectionClosed

        ws, errors = self.realtime(key, manual), []

        def done(event: dict) -> bool:
            if event["type"] == "error":  # (waiting for a response: an error about an earlier frame goes on)
                errors.append(str(event["error"].get("message")))
                return wait_for != "response.done" or event["error"].get("event_id") == "last"
            return event["type"] == wait_for

        try:
            for frame in frames:
                ws.send(frame)
            if wait_for == "input_audio_buffer.cleared":
                ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "probe"}))
            until(ws, done, timeout)
        except ConnectionClosed as exc:
            self.sockets.pop(key, None)
            return Answer(500, f"the socket closed: {exc}")
        except TimeoutError:
            self.sockets.pop(key).close()
            return Answer(500, f"no {wait_for} within {timeout:.0f} s")
        return Answer(400, errors[0]) if errors else Answer(200)

    def voice(self, start: bytes, pcm: bytes = b"") -> Answer:
        """The page's voice socket: a start frame, binary PCM frames, stop; what it says within 1 s."""
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        with connect(self.url.replace("http", "ws", 1) + "/voice/ws", max_size=None, open_timeout=60) as ws:
            try:
                try:
                    ws.send(start.decode("utf-8") if start else "")
                except UnicodeDecodeError:  # not text: as a client can, in a binary frame
                    ws.send(start)
                for i in range(0, len(pcm), 32_768):
                    ws.send(pcm[i:i + 32_768])
                ws.send(json.dumps({"type": "stop"}))
                deadline = time.monotonic() + 1
                while time.monotonic() < deadline:
                    msg = ws.recv(timeout=max(0.05, deadline - time.monotonic()))
                    if isinstance(msg, str) and json.loads(msg).get("type") == "error":
                        event = json.loads(msg)
                        return Answer(400 if event.get("message") else 500, event.get("message", ""))
                return Answer(200)
            except TimeoutError:
                return Answer(200)
            except ConnectionClosed as exc:
                return Answer(200 if exc.rcvd and exc.rcvd.code in (1000, 1001) else 500, str(exc))

    # --- the page ---

    def page(self, p: Payload, event: str, data: Callable[[dict], list], name: str) -> Answer:
        """Upload a file as the page does, then run the page's event on it; an event that fails
        without a message (a crash) is a 500, one with a message (gr.Error) a 400."""
        up = self.http.post("/gradio_api/upload", files=[("files", (name, p.data))])
        if up.status_code != 200:
            return Answer(up.status_code, up.text[:500])
        ref = {"path": up.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}
        r = self.http.post(f"/gradio_api/call/{event}", json={"data": data(ref)})
        if r.status_code != 200:
            return self.answer(r)
        with self.http.stream("GET", f"/gradio_api/call/{event}/{r.json()['event_id']}") as s:
            text = "".join(s.iter_text())
        if "event: error" in text:
            said = text.split("event: error", 1)[1].partition("data:")[2].strip().split("\n")[0]
            return Answer(400 if said not in ("null", "") else 500, said)
        return Answer(200, "", text[-4000:])


def until(ws, done: Callable[[dict], bool], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if done(event):
            return event
