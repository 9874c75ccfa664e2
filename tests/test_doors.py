"""Every door holds (issue 25): the table of tests/doors.py covers every input the server has, and
the hostile set of tests/payloads.payloads() goes through every door that takes its kind.

A route, a chat or Responses content-part type, a Responses input item, a realtime client
event or item type, a multipart field or a page event taking a file that has no row in
doors.DOORS fails here, and so does a row whose route is gone. The fuzz: every answer a 2xx or a
4xx whose message names the part and shows no server path; no 5xx, no traceback in the log;
the server answers a plain chat at the end. `make test` runs a seeded slice (every door, a few
inputs each); OMNI_FUZZ=each sends every input once, each through a door that takes its kind in
turn (bench/reliability.py runs it), OMNI_FUZZ=all every input through every door that takes its
kind (hours). OMNI_FUZZ_REPORT=path.json writes the figures.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

import payloads as hostile_set
from doors import DOORS, Door, leaves
from tests.test_audio_api import audio_server  # noqa: F401 - the shared app with real speech roles

MODE = os.environ.get("OMNI_FUZZ", "slice")
PER_DOOR = 3  # the slice: inputs per door (at least one of each kind it takes), chosen by a fixed seed


def routes_of(app) -> set[tuple[str, str]]:
    """(method, path) of every route of the FastAPI app, through included routers; WS for sockets,
    PAGE for the mounted Gradio app."""
    found: set[tuple[str, str]] = set()

    def walk(routes, prefix: str = "") -> None:
        for r in routes:
            if hasattr(r, "original_router"):  # FastAPI's included router (its routes keep their own paths)
                walk(r.original_router.routes, prefix + getattr(r.include_context, "prefix", ""))
            elif type(r).__name__ == "Mount":
                found.add(("PAGE", "/gradio_api/upload"))
            elif "WebSocket" in type(r).__name__:
                found.add(("WS", prefix + r.path))
            else:
                found.update((m, prefix + r.path) for m in r.methods - {"HEAD"})
    walk(app.routes)
    return found


def carriers(route: str, prefix: str) -> set[str]:
    return {d.carrier.removeprefix(prefix).split(" (")[0] for d in DOORS if d.route == route and d.carrier.startswith(prefix)}


def test_every_input_of_the_server_has_a_row(audio_server):
    from app.api import CONTENT_PARTS
    from app.audio_api import TranscriptionForm
    from app.bodies import ImageEditForm
    from app.realtime import HANDLERS, ITEM_TYPES, TEXT_PARTS
    from app import responses_api

    app = audio_server._server.config.app.app  # build_app(engine): the Edge around the FastAPI app
    served = routes_of(app)
    rows = {(d.method, d.route) for d in DOORS}
    assert not served - rows, f"routes with no row in tests/doors.py: {sorted(served - rows)}"
    assert not rows - served, f"rows of tests/doors.py naming routes that are gone: {sorted(rows - served)}"
    chat = "/v1/chat/completions"
    assert set(CONTENT_PARTS) == carriers(chat, "content part "), "a chat content-part type without a row"
    assert set(responses_api.PART_TYPES) == carriers("/v1/responses", "content part ")
    assert set(responses_api.ITEM_TYPES) == carriers("/v1/responses", "item ")
    events = {c.split(" ")[0] for c in carriers("/v1/realtime", "event ")}
    assert set(HANDLERS) == events, f"realtime events without a row: {set(HANDLERS) - events}"
    items = carriers("/v1/realtime", "event conversation.item.create ")
    assert {f"content {t}" for t in TEXT_PARTS} | {f"item {t}" for t in ITEM_TYPES if t != "message"} <= items
    for route, fields in (("/v1/audio/transcriptions", TranscriptionForm.model_fields),
                          ("/v1/audio/translations", TranscriptionForm.model_fields),
                          ("/v1/images/edits", {"image", *ImageEditForm.model_fields})):
        assert set(fields) == carriers(route, "multipart "), f"{route}: a multipart field without a row"
    # the page: every event that takes a file the person picks has a row (its upload, then that event)
    page = {d.carrier.split("(")[1].rstrip(")") for d in DOORS if d.method == "PAGE"}
    blocks = next(r.app for r in app.routes if type(r).__name__ == "Mount").blocks
    takes_files = {fn.api_name for fn in blocks.fns.values()
                   if any(type(c).__name__ in ("UploadButton", "File", "MultimodalTextbox", "Image", "Audio", "Video")
                          and getattr(c, "interactive", None) is not False for c in fn.inputs)}
    assert takes_files <= page, f"page events taking files with no row: {takes_files - page}"


def the_runs(doors: list[Door], payloads: list, mode: str = "slice") -> list[tuple[Door, object]]:
    """slice: every door, at least PER_DOOR inputs each (every kind it takes); each: every door,
    and every input once through the doors that take its kind, in turn; all: every pair."""
    rng = random.Random(25)
    runs = [(door, None) for door in doors if not door.kinds]
    if mode == "each":
        turn = Counter()
        for p in payloads:
            takers = [d for d in doors if p.kind in d.kinds]
            runs.append((takers[turn[p.kind] % len(takers)], p))
            turn[p.kind] += 1
        return runs + [(d, rng.choice([p for p in payloads if p.kind in d.kinds])) for d in doors
                       if d.kinds and d not in {door for door, _ in runs}]
    for door in (d for d in doors if d.kinds):
        if mode == "all":
            runs += [(door, p) for p in payloads if p.kind in door.kinds]
            continue
        for i in range(max(PER_DOOR, len(door.kinds))):  # every kind it takes, then more of them in turn
            kind = door.kinds[i % len(door.kinds)]
            mine = [p for p in payloads if p.kind == kind and not p.stream_mb and (door, p) not in runs]
            runs.append((door, rng.choice(mine)))
    return runs


def leaks(text: str) -> list[str]:
    return [p for p in ("/tmp/", "omni-api", "/pytest-", "/work/", "site-packages", "Traceback") if p in text] + \
        re.findall(r"[0-9a-f]{64}", text)


def names_the_part(door: Door, payload, message: str) -> bool:
    from app.images_api import shown_name

    fields = {k for path in leaves(door.template or {}) for k in path if isinstance(k, str)}  # nested ones too
    words = {*door.names, "body", "JSON", "json", "request", *(door.template or {}), *fields}
    if payload is not None and payload.kind in ("image", "audio", "video", "glb"):
        words |= {shown_name(payload.name), "file", "image", "audio"}
    return any(w and w in message for w in words)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            exc = f" ({record.exc_info[0].__name__}: {str(record.exc_info[1])[:300]})" if record.exc_info and record.exc_info[0] else ""
            self.bad.append(f"{record.name}: {record.getMessage()[:300]}{exc}")


def test_hostile_inputs_through_every_door(audio_server, capfd):
    from door_client import Client

    payloads = hostile_set.payloads(seed=0)
    runs = the_runs(DOORS, payloads, MODE)
    assert len(payloads) >= 500 and {d for d, _ in runs} == set(DOORS)
    handler = Records()
    watched = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for log in watched:
        log.addHandler(handler)
    client, counts, problems, started = Client(audio_server.url), Counter(), [], time.monotonic()
    per_door: Counter = Counter()
    trace = os.environ.get("OMNI_FUZZ_TRACE")  # a file: one line per request as it is answered
    try:
        for door, payload in runs:
            t = time.monotonic()
            try:
                got = door.send(client, payload)
            except Exception as exc:  # noqa: BLE001 - the client side failed: a broken connection is the server's
                got = type("A", (), {"status": 599, "message": f"{type(exc).__name__}: {exc}"[:300], "text": ""})()
            per_door[door.name] += time.monotonic() - t
            if trace:
                with open(trace, "a") as f:
                    f.write(f"{time.monotonic() - t:6.1f}s {got.status} {door.name} <- {payload.name if payload else '-'}"
                            f" {got.message[:120]!r}\n")
            counts[f"{got.status // 100}xx"] += 1
            where = f"{door.name} <- {payload.name if payload else '-'}"
            if got.status >= 500 or got.status < 200 or 300 <= got.status < 400:
                problems.append(f"{where}: {got.status} {got.message[:300]}")
            elif got.status >= 400 and (not got.message or leaks(got.message)
                                        or not names_the_part(door, payload, got.message)):
                problems.append(f"{where}: {got.status} unclear: {got.message[:300]!r}")
        r = httpx.post(audio_server.url + "/v1/chat/completions", timeout=120, json={
            "max_tokens": 4, "messages": [{"role": "user", "content": "still there?"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text[:300]
    finally:
        client.close()
        for log in watched:
            log.removeHandler(handler)
    err = capfd.readouterr().err
    took = time.monotonic() - started
    figures = {"inputs": len(payloads), "doors": len(DOORS), "requests": len(runs), "answers": dict(counts),
               "seconds": round(took), "slowest": [(n, round(s)) for n, s in per_door.most_common(8)]}
    print(json.dumps(figures, indent=1))
    shown = [err[max(0, i - 300):i + 2500] for i in [m.start() for m in re.finditer("Traceback", err)][:3]]
    logged = handler.bad + shown  # each traceback with what came just before it (which request it was)
    if os.environ.get("OMNI_FUZZ_REPORT"):
        Path(os.environ["OMNI_FUZZ_REPORT"]).write_text(json.dumps({**figures, "problems": problems,
                                                                    "tracebacks": logged}, indent=1))
    assert not problems, f"{len(problems)} bad answers of {len(runs)}:\n" + "\n".join(problems[:40])
    assert not logged, "tracebacks in the server log:\n" + "\n----\n".join(logged[:6])
