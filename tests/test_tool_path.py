"""One tool path (issue 13): /v1/images picks its backend and makes room through the same
engine function a chat turn uses (toolrun.backend_for); a task with no backend is a 503."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import engine.tools.run as toolrun
from app.images_api import make_image_router
from generators.base import Backend, Result
from generators.registry import Entry


class Resident(Backend):
    """A fake diffusion-style backend: it holds a model, so it needs device room."""
    task, name, resident = "image", "resident-fake", True

    def __init__(self) -> None:
        self.unloaded = 0

    def unload(self) -> None:
        self.unloaded += 1

    def run(self, request, inputs, out_dir: Path, progress, cancel):
        path = out_dir / "out.png"
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
        return Result("image", str(path), {})


def test_the_image_api_makes_room_like_a_chat_turn(engine, monkeypatch):
    fake = Resident()
    engine.generators.extras.append(Entry("image", "resident-fake", lambda: fake, lambda: (True, "")))
    rooms = []
    monkeypatch.setattr(toolrun, "make_room_for_diffusion", lambda eng: rooms.append(eng) or 0)
    app = FastAPI()
    app.include_router(make_image_router(engine))
    r = TestClient(app).post("/v1/images/generations", json={"prompt": "a red boat", "size": "64x64"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["backend"] == "resident-fake"
    assert base64.b64decode(r.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
    assert rooms == [engine]  # the LLM was asked to give its room before the pipeline ran


def test_a_task_with_no_backend_is_a_503_that_says_what_to_set(engine, monkeypatch):
    monkeypatch.setattr(engine.generators, "_scan", lambda task: ([], ["x: no weights"]))
    app = FastAPI()
    app.include_router(make_image_router(engine))
    r = TestClient(app).post("/v1/images/generations", json={"prompt": "a red boat"})
    assert r.status_code == 503
    assert "not available" in r.json()["error"]["message"] or "set" in r.json()["error"]["message"]
