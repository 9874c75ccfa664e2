"""The edge of the server: every request and WebSocket passes here before any route reads it.

- Host: only the names this server is reached by (loopback, `--host`, `--allowed-hosts`), so a
  page on a rebinding domain (`rebind.evil.example` resolving to 127.0.0.1) gets nothing.
- Origin: a browser request from another site's page is refused, whatever its method: no web
  page can drive the assistant, read its conversations or open its voice socket.
- Size: a body larger than its route's limit is refused by `Content-Length` before a byte is
  read, and while streaming when the header lies or is absent.
- Token (when one is set): our own routes (/v1, including its docs, and /voice) take the bearer
  token, `?token=` on the socket, or the session cookie of a login on the page; compared in
  constant time. Wrong guesses back off per client (behind a `--trusted-proxy`, the client it
  names in X-Forwarded-For); the right token, cookie or password is served at once whatever
  came before from that address, so nobody sharing it can lock the owner out. Gradio's own
  routes stay behind Gradio's login, whose wrong guesses count against the same back-off.
"""
from __future__ import annotations

import hmac
import json
import math
import threading
import time
from collections import OrderedDict
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from app.bodies import error_body
from engine.config import LOOPBACK, Config

PROTECTED = ("/v1", "/voice")
UPLOAD_PATHS = ("/gradio_api/upload", "/v1/images/edits")  # multipart, spooled to disk by the parser
UPLOAD_FILES = 10  # files one Gradio upload request may carry, each within --max-upload-mb
WILDCARD_HOSTS = ("0.0.0.0", "::")


class Lockout:
    """Wrong-token guesses per client address: FREE_TRIES are free, then each further one makes
    the address's next wrong guess wait twice as long as the last (1 s, 2 s, 4 s ... up to MAX_S);
    forgotten after MAX_S without one. Only wrong guesses wait (the Edge serves a right token at
    once), so a success does not reset it: whoever else shares the address keeps backing off."""

    FREE_TRIES = 5
    MAX_S = 300.0
    MAX_CLIENTS = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()  # ip -> (failures, locked until)

    def retry_after(self, ip: str) -> float:
        """Seconds this address must wait before its next try (0: may try now)."""
        with self._lock:
            _, until = self._fails.get(ip, (0, 0.0))
        return max(0.0, until - self._clock())

    def failed(self, ip: str) -> None:
        with self._lock:
            n, until = self._fails.pop(ip, (0, 0.0))
            n = 1 if n and self._clock() > until + self.MAX_S else n + 1
            wait = min(self.MAX_S, 2.0 ** (n - self.FREE_TRIES - 1)) if n > self.FREE_TRIES else 0.0
            self._fails[ip] = (n, self._clock() + wait)
            while len(self._fails) > self.MAX_CLIENTS:
                self._fails.popitem(last=False)


def _split_host(value: str) -> tuple[str, str]:
    """'Host' header or netloc -> (lower-case name without brackets, port or '')."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest.lstrip(":")
    name, _, port = value.partition(":")
    return name, port


class Edge:
    """ASGI middleware around the whole app (UI, API, voice socket); see the module docstring."""

    def __init__(self, app, config: Config, session_ok: Callable[[dict[str, str]], bool] = lambda c: False,
                 lockout: Lockout | None = None) -> None:
        self.app = app
        self.config = config
        self.session_ok = session_ok  # cookies -> is this a logged-in page session?
        self.lockout = lockout or Lockout()
        self.hosts = {*LOOPBACK, config.host.lower(), *(h.lower() for h in config.allowed_hosts)}
        self.any_host = config.host in WILDCARD_HOSTS and not config.allowed_hosts
        self.origins = {o.rstrip("/").lower() for o in config.allowed_origins}
        self.proxies = set(config.trusted_proxies)

    def client(self, peer: str, forwarded: str) -> str:
        """Who is asking: the peer, or behind a trusted proxy the nearest address in
        X-Forwarded-For that is not one of the trusted proxies (what a client writes there
        itself is further left, and not believed)."""
        if peer not in self.proxies or not forwarded:
            return peer
        for hop in reversed([h.strip() for h in forwarded.split(",")[-32:]]):
            if hop and hop not in self.proxies:
                return hop[:64]
        return peer

    # --- the checks, each a plain function of headers so they read (and test) on their own ---

    def host_ok(self, host: str) -> bool:
        return self.any_host or _split_host(host)[0] in self.hosts

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, file: pages) and anything odd
        o_name, o_port = _split_host(parts.netloc)
        h_name, h_port = _split_host(host)
        if (o_name, o_port) == (h_name, h_port):
            return True  # same origin
        return o_name in LOOPBACK and h_name in LOOPBACK and o_port == h_port

    def body_limit(self, path: str) -> int:
        if path.startswith(UPLOAD_PATHS[0]):
            return self.config.max_upload_mb * 1_000_000 * UPLOAD_FILES + 1_000_000
        if path.startswith(UPLOAD_PATHS[1]):
            return self.config.max_upload_mb * 1_000_000 + 1_000_000
        return self.config.max_request_mb * 1_000_000

    def token_ok(self, headers: dict[str, str], query: str, websocket: bool) -> bool | None:
        """True: the token (or a page login's cookie) is right; False: a wrong one was given;
        None: none was (not a guess)."""
        token = self.config.auth_token.encode()
        auth = headers.get("authorization", "")
        given = [auth[7:].strip()] if auth[:7].lower() == "bearer " else []
        if websocket:
            given += parse_qs(query).get("token", [])
        if any(hmac.compare_digest(g.encode(), token) for g in given):
            return True
        if self.session_ok(_cookies(headers.get("cookie", ""))):
            return True
        return False if given else None

    # --- ASGI ---

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, host, origin = scope.get("path", ""), headers.get("host", ""), headers.get("origin")
        ip = self.client((scope.get("client") or ("?", 0))[0], headers.get("x-forwarded-for", ""))
        if not self.host_ok(host):
            return await _refuse(kind, send, 421, f"this server does not answer to the host {host[:80]!r}; "
                                                  "add it with --allowed-hosts if it is yours")
        if origin is not None and not self.origin_ok(origin, host):
            return await _refuse(kind, send, 403, "requests from another site's pages are refused; "
                                                  "allow that origin with --allowed-origins if it is yours")
        if (kind == "http" and scope.get("method") not in ("GET", "HEAD", "OPTIONS")
                and headers.get("sec-fetch-site") == "cross-site"):
            return await _refuse(kind, send, 403, "cross-site requests are refused")
        login = bool(self.config.auth_token) and path.rstrip("/") == "/login"
        if self.config.auth_token and path.startswith(PROTECTED):
            ok = self.token_ok(headers, scope.get("query_string", b"").decode("latin-1"), kind == "websocket")
            if ok is None:
                return await _refuse(kind, send, 401, "a bearer token is required")
            if not ok:
                if wait := self.lockout.retry_after(ip):  # (a guess while backing off is not counted again)
                    return await _refuse(kind, send, 429, f"too many wrong tokens; try again in {math.ceil(wait)} s",
                                         {"retry-after": str(math.ceil(wait))})
                self.lockout.failed(ip)
                return await _refuse(kind, send, 401, "wrong bearer token")
        if kind == "websocket":
            return await self.app(scope, receive, send)
        limit = self.body_limit(path)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(kind, send, 413, f"the request body is {int(declared) / 1e6:.1f} MB; "
                                                  f"the limit here is {limit / 1e6:.0f} MB")
        if login and (wait := self.lockout.retry_after(ip)):
            # backing off: only the right password gets through (read here, bounded, then replayed)
            body = await _read_body(receive, LOGIN_BYTES)
            if body is None or not self.password_ok(headers, body):
                return await _refuse(kind, send, 429, f"too many wrong tokens; try again in {math.ceil(wait)} s",
                                     {"retry-after": str(math.ceil(wait))})
            receive = _replay(body, receive)
        await self._bounded(scope, receive, send, limit, ip if login else None)

    def password_ok(self, headers: dict[str, str], body: bytes) -> bool:
        """Whether a login form (urlencoded or multipart, as Gradio's page posts it) carries the token."""
        from email.parser import BytesParser
        from email.policy import HTTP

        kind = headers.get("content-type", "")
        given: list[bytes] = []
        if kind.startswith("application/x-www-form-urlencoded"):
            given = [v.encode() for v in parse_qs(body.decode("latin-1")).get("password", [])]
        elif kind.startswith("multipart/form-data"):
            message = BytesParser(policy=HTTP).parsebytes(f"content-type: {kind}\r\n\r\n".encode("latin-1") + body)
            given = [part.get_payload(decode=True) or b"" for part in message.iter_parts()
                     if part.get_param("name", header="content-disposition") == "password"]
        token = self.config.auth_token.encode()
        return any(hmac.compare_digest(g, token) for g in given)

    async def _bounded(self, scope, receive, send, limit: int, login_ip: str | None) -> None:
        """Run the app with a body counter; past `limit` the app's own response is dropped and
        a 413 sent instead. For a login, a refused password counts as a wrong guess."""
        state = {"read": 0, "over": False, "started": False}

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["over"] = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                if login_ip is not None and message["status"] in (400, 401):
                    self.lockout.failed(login_ip)
            await send(message)

        from starlette.requests import ClientDisconnect

        try:
            await self.app(scope, counted, guarded_send)
        except (BodyTooLarge, ClientDisconnect):  # (a client gone mid-body: nobody to answer)
            pass
        if state["over"] and not state["started"]:
            await _refuse("http", send, 413, f"the request body is over the limit here of {limit / 1e6:.0f} MB")


class BodyTooLarge(Exception):
    """Raised into the app from `receive` when the body passes its limit."""


LOGIN_BYTES = 64_000  # a login form read by the edge itself (while its address backs off)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None past `limit` bytes or when the client goes away."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


def _replay(body: bytes, receive):
    """A `receive` that hands the app a body already read, then the server's own messages
    (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _cookies(header: str) -> dict[str, str]:
    from starlette.requests import cookie_parser

    return cookie_parser(header) if header else {}


async def _refuse(kind: str, send, status: int, message: str, extra: dict | None = None) -> None:
    if kind == "websocket":  # closing before accept answers the handshake with HTTP 403
        await send({"type": "websocket.close", "code": 4000 + status, "reason": message[:120]})
        return
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def gradio_session(app) -> Callable[[dict[str, str]], bool]:
    """cookies -> whether they hold a live login of the Gradio page mounted in `app` (the page's
    own fetches and its voice socket then need no token of their own)."""
    def ok(cookies: dict[str, str]) -> bool:
        from gradio.routes import App as GradioApp
        from starlette.routing import Mount

        for route in app.routes:
            sub = route.app if isinstance(route, Mount) else None
            if isinstance(sub, GradioApp):
                for name in (f"access-token-{sub.cookie_id}", f"access-token-unsecure-{sub.cookie_id}"):
                    if cookies.get(name) and cookies[name] in sub.tokens:
                        return True
        return False

    return ok
