"""OpenAI-style image endpoints on the app's server, over the same generators.

`POST /v1/images/generations` (JSON: prompt, size "WxH", n, seed, steps,
response_format b64_json) and `POST /v1/images/edits` (multipart: image,
prompt). They run the generator the chat would pick, outside any
conversation; an unavailable role answers 503 with what to set.
"""
from __future__ import annotations

import asyncio
import base64
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.bodies import ImageEditForm, ImageRequest, error, invalid

from engine.errors import InputError
from engine.events import CancelToken
from engine.tools.run import NoBackend
from generators.base import Cancelled, GenerationError, RequestError, no_progress, validate
from generators.tools import TOOLS


def shown_name(filename: str | None, limit: int = 80) -> str:
    """A client's file name as it may appear in a message: its last part, printable, bounded."""
    name = "".join(c for c in Path(str(filename or "")).name if c.isprintable()).strip(" .") or "image"
    return name if len(name) <= limit else name[:limit - 1] + "…"


def make_image_router(engine) -> APIRouter:
    router = APIRouter(prefix="/v1/images")  # the token, when set, is checked in app/security.Edge

    async def run(task: str, request: dict, inputs: list[Path]) -> JSONResponse:
        cancel = CancelToken()

        def work() -> list[dict]:
            from engine.tools.run import backend_for  # picks the backend and makes room, as a chat turn does

            backend = backend_for(engine, task, request, inputs)
            with tempfile.TemporaryDirectory(prefix="omni-api-") as tmp:
                result = backend.run(dict(request), inputs, Path(tmp), no_progress, cancel)
                data = base64.b64encode(Path(result.path).read_bytes()).decode()
            return [{"b64_json": data, "revised_prompt": request.get("prompt") or request.get("instruction"),
                     "backend": backend.name}]

        try:
            data = await asyncio.to_thread(work)
        except asyncio.CancelledError:
            cancel.cancel("client went away")
            raise
        except NoBackend as exc:
            return error(503, str(exc), "server_error")
        except RequestError as exc:
            return error(400, str(exc))
        except Cancelled:
            return error(499, "cancelled")
        except GenerationError as exc:
            return error(500, str(exc), "server_error")
        return JSONResponse({"created": int(time.time()), "data": data})

    @router.post("/generations")
    async def generations(request: Request):
        from app.api import read_json

        try:
            asked = ImageRequest.model_validate(await read_json(request))
            args = validate(TOOLS["generate_image"].schema, asked.arguments())
        except ValidationError as exc:
            return invalid(exc)
        except (ValueError, RequestError) as exc:
            return error(400, str(exc))
        return await run("image", args, [])

    @router.post("/edits")
    async def edits(request: Request):
        from engine import media as media_mod

        try:
            form = await request.form()
            fields = ImageEditForm.model_validate({k: v for k, v in form.multi_items() if isinstance(v, str)})
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ValueError("send the image as a multipart file field named 'image'")
            try:
                args = validate(TOOLS["edit_image"].schema, {"instruction": fields.prompt, "image": "upload"})
            except RequestError as exc:  # the tool calls it the instruction; the client sent it as `prompt`
                raise ValueError(f"prompt: {str(exc).replace('instruction', 'the edit instruction')}") from None
            with tempfile.TemporaryDirectory(prefix="omni-api-in-") as tmp:
                src = Path(tmp) / "upload"  # the client's file name is shown, never used as a path
                with open(src, "wb") as out:
                    while block := await upload.read(1 << 20):
                        out.write(block)
                record = media_mod.ingest(src, engine.media_dir, engine.config.max_upload_mb * 1_000_000,
                                          shown_name(upload.filename))
            if record.kind != "image":
                raise ValueError(f"{record.name} is {record.kind}, not an image")
        except ValidationError as exc:
            return invalid(exc)
        except (ValueError, RequestError, InputError) as exc:
            return error(400, str(exc))
        return await run("edit_image", args, [Path(record.path)])

    return router
