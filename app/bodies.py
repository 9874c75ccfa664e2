"""The typed bodies of the /v1 requests, and the one shape of an API error.

Every JSON body is read into a pydantic model (as FastAPI expects; the
multipart forms of /v1/audio and /v1/images/edits too), so a malformed one
gets OpenAI's 400 naming the field:
`{"error": {"message": "messages[0].role: ...", "type": "invalid_request_error",
"param": "messages[0].role", "code": 400}}`. Fields this server does not read are
accepted and ignored (clients send OpenAI's whole set); the ones it reads are
checked strictly (no "5" for 5, no true for 1).
"""
from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    """An API error in OpenAI's shape (their clients raise it as BadRequestError etc.)."""
    return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)


def where(loc: tuple) -> str:
    """A pydantic error's location as a field path: ("messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "body"


def invalid(exc: ValidationError) -> JSONResponse:
    """The 400 for a body its model refused: each bad field named with what was wrong."""
    problems = exc.errors()
    said = "; ".join(f"{where(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in problems[:5])
    return error(400, said, param=where(problems[0]["loc"]) if problems else None)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None  # text, or parts (text, image_url, input_audio: app/api._messages)


class AudioOutput(Body):
    voice: str = ""
    format: str = "wav"  # (app/chat_audio.FORMATS says which)


class ChatRequest(Body):
    """POST /v1/chat/completions."""

    model: str = ""
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None

    @field_validator("messages")
    @classmethod
    def _some(cls, messages: list) -> list:
        if not messages:
            raise ValueError("'messages' must be a non-empty list")
        return messages


class ImageRequest(Body):
    """POST /v1/images/generations (the tool's schema then checks the prompt and the numbers)."""

    model: str = ""
    prompt: str = ""
    n: Literal[1] = 1
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$", description="WIDTHxHEIGHT, e.g. 512x512")
    response_format: Literal["b64_json"] = Field("b64_json", description="b64_json only: files stay on this machine")
    seed: int | None = None
    steps: int | None = None
    negative_prompt: str | None = None

    def arguments(self) -> dict:
        """The generate_image tool's arguments (validated against its schema by the caller)."""
        args: dict = {"prompt": self.prompt}
        if self.size:
            width, _, height = self.size.partition("x")
            args["width"], args["height"] = int(width), int(height)
        return {**args, **self.model_dump(include={"seed", "steps", "negative_prompt"}, exclude_none=True)}


class ImageEditForm(Body):
    """The text fields of POST /v1/images/edits (multipart; the image is the file field 'image')."""

    model_config = ConfigDict(extra="ignore")  # (form fields are all text)
    prompt: str = Field("", max_length=4000)
    model: str = ""
    n: Literal["1"] = "1"
    response_format: Literal["b64_json"] = "b64_json"
