"""Every door of the server that takes data, in one table (issue 25): DOORS.

A row names a door (method + route + what carries the data there: a JSON body, a content-part
type, a multipart field, a realtime event, a socket frame, the page's upload or import), the
kinds of input it takes (image, audio, video, glb, json, text, pcm: tests/payloads.Payload) and
how to send one through it (`door.send(client, payload) -> Answer`). tests/test_doors.py checks
that the app's routes, chat and Responses content parts, realtime events and multipart fields
each have a row here, and pushes the hostile set of tests/payloads.payloads() through every row
that takes its kind. A new endpoint or part type without a row fails that test.
"""
from __future__ import annotations

import base64
import copy
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from door_client import Answer, Client
from payloads import Payload

AUDIO_FORMAT = {".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".ogg": "ogg", ".opus": "opus", ".m4a": "m4a",
                ".mp4": "mp4", ".webm": "webm", ".aac": "aac"}


@dataclass(frozen=True)
class Door:
    method: str  # GET POST DELETE | WS (a socket) | PAGE (the Gradio page)
    route: str
    carrier: str  # what carries the data: "body", "content part image_url", "multipart file", "event ..."
    kinds: tuple[str, ...]  # the payload kinds it takes; () for a route that takes no data (called once)
    send: Callable[["Client", Payload | None], Answer] = field(compare=False, repr=False)
    template: dict | None = field(default=None, compare=False, repr=False)  # a valid body / event / form
    names: tuple[str, ...] = ()  # a 4xx message names the part: one of these (and the template's keys)

    @property
    def name(self) -> str:
        return f"{self.method} {self.route} [{self.carrier}]"


# ---- building bodies ----------------------------------------------------------------------------

def leaves(doc, path=()) -> list[tuple]:
    """Paths to a template's fields: the top level first, then nested leaves."""
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        return [path]
    top = [path + (k,) for k, _ in items]
    return top + [p for k, v in items if isinstance(v, (dict, list)) for p in leaves(v, path + (k,))]


def put(doc, path: tuple, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


SPLICE = "\u0000splice\u0000"


def body(template: dict, slot: tuple | None, text_slot: tuple | None, p: Payload) -> bytes:
    """The payload in a door's template: raw JSON spliced in at `slot` (the whole body when None),
    a wrong-type recipe ({"$wrong": [k, value]}) at the template's k-th field, a text at `text_slot`."""
    if p.kind == "text":
        return json.dumps(put(template, text_slot, p.data.decode("utf-8", "surrogatepass"))).encode()
    if p.family == "wrong-type":
        k, value = json.loads(p.data)["$wrong"]
        paths = leaves(template)
        return json.dumps(put(template, paths[k % len(paths)], value)).encode()
    if slot is None:
        return p.data
    head, tail = json.dumps(put(template, slot, SPLICE)).encode().split(json.dumps(SPLICE).encode())
    return head + p.data + tail


def data_url(p: Payload, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(p.data).decode()}"


def b64(p: Payload) -> str:
    return base64.b64encode(p.data).decode()


def ext(p: Payload) -> str:
    return os.path.splitext(p.name)[1].lower()


# ---- the table ------------------------------------------------------------------------------------

FILES = ("image", "audio", "video", "glb")
CHAT = {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
WAV = None  # a valid short WAV for the rows whose data is another field (made on first use)
PNG = None


def valid(kind: str) -> bytes:
    import hostile

    global WAV, PNG
    if WAV is None:
        WAV, PNG = hostile.sound("WAV", 0.3), hostile.png(32, 24)
    return WAV if kind == "audio" else PNG


def json_door(route: str, template: dict, text_slot: tuple | None, carrier: str = "body", slot: tuple | None = None,
              names: tuple = ()) -> Door:
    def send(c: Client, p: Payload) -> Answer:
        return c.post(route, body(template, slot, text_slot, p), p.stream_mb if slot is None else 0)
    return Door("POST", route, carrier, ("json", "text") if text_slot else ("json",), send, template, names)


def chat_part(kind: str, kinds: tuple, part: Callable[[Payload], dict]) -> Door:
    def send(c: Client, p: Payload) -> Answer:
        content = [{"type": "text", "text": "what is it?"}, part(p)] if kind != "text" else [part(p)]
        return c.post("/v1/chat/completions", json.dumps(put(CHAT, ("messages", 0, "content"), content)).encode())
    return Door("POST", "/v1/chat/completions", f"content part {kind}", kinds, send, CHAT,
                ("messages", "image-0", "audio-0"))


def text_of(p: Payload) -> str:
    return p.data.decode("utf-8", "surrogatepass")


def responses_item(carrier: str, kinds: tuple, item: Callable[[Payload], list]) -> Door:
    template = {"max_output_tokens": 1, "store": False, "input": "hi"}

    def send(c: Client, p: Payload) -> Answer:
        return c.post("/v1/responses", json.dumps(put(template, ("input",), item(p))).encode())
    return Door("POST", "/v1/responses", carrier, kinds, send, template, ("input",))


def message(*parts: dict) -> list:
    return [{"type": "message", "role": "user", "content": list(parts)}]


def multipart(route: str, file_field: str, file_kind: str, name: str, fields: dict) -> Door:
    """A multipart field of `route`: the file field takes files, the others texts (beside a valid file)."""
    def send(c: Client, p: Payload) -> Answer:
        if name == file_field:
            return c.form(route, {file_field: (p.name, p.data)}, fields)
        value = text_of(p).encode("utf-8", "surrogatepass")
        return c.form(route, {file_field: (f"ok{'.wav' if file_kind == 'audio' else '.png'}", valid(file_kind))},
                      {**fields, name: value})
    kinds = (("audio", "video") if file_kind == "audio" else ("image", "video", "glb")) if name == file_field else ("text",)
    refusals = ("translate",) if route.endswith("translations") else ()  # (an English-only model: the route says so)
    return Door("POST", route, f"multipart {name}", kinds, send, {name: ""}, (name, "file", "image", *refusals))


def get(route: str, kinds: tuple = (), method: str = "GET") -> Door:
    from urllib.parse import quote

    def send(c: Client, p: Payload | None) -> Answer:
        path = route if p is None else route.split("{")[0] + quote(text_of(p)[:4000].encode("utf-8", "surrogatepass"), safe="")
        with c.http.stream(method, path) as r:
            return c.answer(r)
    return Door(method, route, "path" if kinds else "none", kinds, send,
                names=("Not Found", "no stored response", "no model named", "WebSocket"))


def frame(p: Payload) -> str:
    return p.data.decode("utf-8", "replace")


def realtime(carrier: str, kinds: tuple, frames: Callable[[Payload | None], list], wait_for: str = "input_audio_buffer.cleared",
             manual: bool = False, template: dict | None = None, names: tuple = ()) -> Door:
    def send(c: Client, p: Payload | None) -> Answer:
        return c.realtime_send(carrier, frames(p), wait_for, manual)
    words = tuple(w for w in carrier.replace("(", " ").replace(".", " ").replace("_", " ").split() if len(w) > 3)
    return Door("WS", "/v1/realtime", carrier, kinds, send, template, names + words + ("JSON",))


def event(template: dict, slot: tuple | None = None, text_slot: tuple | None = None) -> Callable[[Payload], list]:
    return lambda p: [body(template, slot, text_slot, p).decode("utf-8", "replace")]


def answered(*first: Callable[[Payload], dict]) -> Callable[[Payload], list]:
    """Frames, then response.create (event_id "last"): the door's data is read into a real turn."""
    return lambda p: [json.dumps(f(p)) for f in first] + [json.dumps({"type": "response.create", "event_id": "last",
                                                                      "response": {"modalities": ["text"]}})]


SESSION = {"type": "session.update", "session": {"instructions": "be brief", "modalities": ["text"]}}
VOICE_START = {"type": "start", "sample_rate": 16000}
RT_APPEND = lambda p: {"type": "input_audio_buffer.append", "audio": b64(p)}  # noqa: E731
RT_ITEM = lambda kind: (lambda p: {"type": "conversation.item.create", "item": {  # noqa: E731
    "type": "message", "role": "user", "content": [{"type": kind, "text": text_of(p)}]}})


def _doors() -> list[Door]:
    from app.api import CONTENT_PARTS  # noqa: F401 - the rows below name each (tests/test_doors.py checks)
    from app.audio_api import TranscriptionForm
    from app.bodies import ImageEditForm

    doors = [
        json_door("/v1/chat/completions", CHAT, ("messages", 0, "content"), names=("messages",)),
        chat_part("text", ("text",), lambda p: {"type": "text", "text": text_of(p)}),
        chat_part("image_url", ("image", "video", "glb"), lambda p: {"type": "image_url", "image_url": {"url": data_url(p)}}),
        chat_part("input_audio", ("audio", "video"), lambda p: {"type": "input_audio", "input_audio": {
            "data": b64(p), "format": AUDIO_FORMAT.get(ext(p), "wav")}}),
        chat_part("video_url", ("video",), lambda p: {"type": "video_url", "video_url": {"url": data_url(p, "video/mp4")}}),
        chat_part("file", ("image", "json", "text"), lambda p: {"type": "file", "file": {"file_data": b64(p),
                                                                                        "filename": p.name}}),
        json_door("/v1/completions", {"max_tokens": 1, "prompt": "hi"}, ("prompt",)),
        json_door("/v1/responses", {"max_output_tokens": 1, "store": False, "input": "hi"}, ("input",)),
        *[responses_item(f"content part {t}", ("text",), lambda p, t=t: message({"type": t, "text": text_of(p)}))
          for t in ("input_text", "output_text", "text")],
        responses_item("content part input_image", ("image", "video", "glb"),
                       lambda p: message({"type": "input_image", "image_url": data_url(p)})),
        responses_item("item message", ("json",), lambda p: [json.loads(body({"type": "message", "role": "user",
                                                                            "content": "hi"}, None, None, p))]
                       if p.family == "wrong-type" else [{"type": "message", "role": "user", "content": frame(p)}]),
        responses_item("item function_call", ("text",), lambda p: [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": text_of(p)},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"}]),
        responses_item("item function_call_output", ("text",), lambda p: [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": text_of(p)}]),
        get("/v1/responses/{rid}", ("text",)), get("/v1/responses/{rid}", ("text",), "DELETE"),
        get("/v1/models/{model:path}", ("text",)),
        *[get(r) for r in ("/v1/models", "/v1/status", "/v1/audio/voices", "/v1/realtime", "/v1/openapi.json",
                           "/v1/docs", "/docs/oauth2-redirect", "/redoc")],
        json_door("/v1/audio/speech", {"input": "hi", "response_format": "wav"}, ("input",)),
        json_door("/v1/images/generations", {"prompt": "a boat", "size": "64x64", "steps": 1}, ("prompt",)),
        json_door("/voice/read-aloud", {"text": "hi"}, ("text",)),
        *[multipart(route, "file", "audio", name, {"model": "whisper-1"})
          for route in ("/v1/audio/transcriptions", "/v1/audio/translations") for name in TranscriptionForm.model_fields],
        *[multipart("/v1/images/edits", "image", "image", name, {"prompt": "make it blue"})
          for name in ("image", *ImageEditForm.model_fields)],
        realtime("text frame", ("json",), lambda p: [frame(p)]),
        realtime("binary frame", ("pcm",), lambda p: [p.data]),
        realtime("event session.update", ("json", "text"), event(SESSION, ("session",), ("session", "instructions")),
                 "session.updated", template=SESSION, names=("session", "instructions")),
        realtime("event input_audio_buffer.append", ("audio", "pcm"), lambda p: [json.dumps(RT_APPEND(p))],
                 names=("audio",)),
        realtime("event input_audio_buffer.append (manual, answered)", ("audio", "pcm"), answered(
            RT_APPEND, lambda p: {"type": "input_audio_buffer.commit"}), "response.done", manual=True,
                 names=("audio", "buffer", "answer")),
        realtime("event input_audio_buffer.commit", (), lambda p: [json.dumps({"type": "input_audio_buffer.commit"})]),
        realtime("event input_audio_buffer.clear", (), lambda p: []),
        realtime("event response.cancel", (), lambda p: [json.dumps({"type": "response.cancel"})]),
        *[realtime(f"event conversation.item.create content {t}", ("text",), answered(RT_ITEM(t)), "response.done",
                   manual=True, names=("text", "item")) for t in ("input_text", "text")],
        realtime("event conversation.item.create item function_call_output", ("text",), answered(
            lambda p: {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c1",
                                                                     "output": text_of(p)}}),
                 "response.done", manual=True, names=("output",)),
        realtime("event conversation.item.create", ("json",), event({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}, ("item",)),
                 names=("item", "conversation.item.create", "content", "text")),
        realtime("event response.create", ("json",), event({"type": "response.create", "response": {
            "modalities": ["text"]}}, ("response",)), names=("modalities", "answer", "response")),
        realtime("event conversation.item.truncate", ("json",), event({"type": "conversation.item.truncate",
                                                                      "item_id": "x", "content_index": 0}, ("item_id",))),
        Door("WS", "/voice/ws", "start frame", ("json",), lambda c, p: c.voice(body(VOICE_START, None, None, p)),
             VOICE_START, ("sample_rate", "start", "JSON", "Voice mode")),
        Door("WS", "/voice/ws", "binary frames", ("audio", "pcm"),
             lambda c, p: c.voice(json.dumps(VOICE_START).encode(), p.data)),
        Door("PAGE", "/gradio_api/upload", "attachment (respond)", FILES,
             lambda c, p: c.page(p, "respond", lambda ref: [{"text": "what is it?", "files": [ref]}, None], p.name)),
        Door("PAGE", "/gradio_api/upload", "sidebar import (import_file)", ("json",),
             lambda c, p: c.page(p, "import_file", lambda ref: [ref], "conversation.json")),
    ]
    return doors


DOORS = _doors()

