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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_CHOICES = 8  # `n`: answers sampled at once (each a sequence of the model's batch)
MAX_STOPS = 8
# OpenAI fields this server cannot honour: a 400 naming them, never silently ignored
# (fields that only label a request, such as `user`, `metadata` or `store` for chat, are accepted)
REFUSED = {"prediction": "predicted outputs", "web_search_options": "web search",
           "reasoning": "reasoning settings", "background": "background responses",
           "conversation": "conversation objects: use previous_response_id"}


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


def refused(body):
    """A request body that sets a field this server cannot honour: ValueError naming it."""
    if isinstance(body, dict):
        for name, what in REFUSED.items():
            if body.get(name) not in (None, False, {}, []):
                raise ValueError(f"'{name}' is not supported by this server ({what})")
    return body


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None  # text, or parts (text, image_url, input_audio: app/api._messages)
    tool_calls: list[dict] | None = None  # an assistant's calls: [{"id", "type", "function": {"name", "arguments"}}]
    tool_call_id: str | None = None  # a tool's result: the call it answers


class FunctionDef(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = Field("", max_length=8000)
    parameters: dict | None = None  # a JSON Schema (an object); none: no arguments
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class Named(Body):
    name: str


class NamedChoice(Body):
    type: Literal["function"]
    function: Named


class JsonSchemaFormat(Body):
    name: str = Field("response", max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str = ""


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _has_schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("a json_schema response_format needs json_schema.schema")
        return self


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The sampling fields OpenAI's chat and completions share (app/openai_params.py turns them
    into the engine's GenParams)."""

    model: str = ""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None

    _refused = model_validator(mode="before")(classmethod(lambda cls, body: refused(body)))

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > 200 for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} stop strings, each of 1 to 200 characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        for key, value in (bias or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise ValueError("logit_bias maps token ids (as strings) to numbers from -100 to 100")
        return bias


class AudioOutput(Body):
    voice: str = ""
    format: str = "wav"  # (app/chat_audio.FORMATS says which)


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[FunctionDef] | None = None  # (the older form of tools)
    function_call: Literal["auto", "none"] | Named | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _some(cls, messages: list) -> list:
        if not messages:
            raise ValueError("'messages' must be a non-empty list")
        return messages

    @model_validator(mode="after")
    def _older_forms(self):
        """`functions` and `function_call` (OpenAI's first form) read as tools and tool_choice."""
        if self.functions and not self.tools:
            self.tools = [Tool(type="function", function=f) for f in self.functions]
        if self.function_call is not None and self.tool_choice is None:
            call = self.function_call
            self.tool_choice = call if isinstance(call, str) else NamedChoice(type="function", function=call)
        return self


class CompletionRequest(Sampling):
    """POST /v1/completions (a prompt without the chat template; `suffix`: fill in the middle)."""

    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(prompts) != 1:
            raise ValueError("send one prompt per request (a list of several is not supported)")
        return prompts[0]


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
