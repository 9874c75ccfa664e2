"""OpenAI's request fields as the engine's GenParams, checked against what the model can do.

A field the loaded model cannot honour (a backend without local logits asked for tools, a
grammar or log-probabilities) is a ValueError naming it (the API's 400), never ignored.
Tool and response schemas are compiled here, before the answer starts, so a schema the
grammar engine cannot take is a 400 saying which one.
"""
from __future__ import annotations

from dataclasses import replace

from app.bodies import ChatRequest, NamedChoice, Sampling
from engine.llm.base import GenParams

FEATURE_OF = {"tools": "tools", "response_format": "response_format", "logprobs": "logprobs",
              "presence_penalty": "penalties", "frequency_penalty": "penalties", "logit_bias": "logit_bias",
              "prompt": "raw_prompt", "suffix": "fim"}


def sampling(engine, body: Sampling, max_tokens: int | None, logprobs: int | None) -> GenParams:
    """The fields chat and completions share."""
    params = engine.params(max_tokens, body.temperature, body.top_p, body.seed)
    return replace(params, stop=tuple(body.stop or ()), presence_penalty=body.presence_penalty,
                   frequency_penalty=body.frequency_penalty, logprobs=logprobs,
                   logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()))


def with_facts(engine, params: GenParams, body: Sampling) -> GenParams:
    """Facts or a transcript joined the prompt: unless a temperature was given, llm.facts_temperature."""
    return replace(params, temperature=engine.params(None, body.temperature, facts=True).temperature)


def chat_params(engine, body: ChatRequest) -> GenParams:
    """GenParams of a chat request (blocking: a check may wait for the model to load)."""
    tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling(engine, body, tokens, (body.top_logprobs or 0) if body.logprobs else None)
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools or ()]
    names = [t["function"]["name"] for t in tools]
    choice = body.tool_choice or "auto"
    if isinstance(choice, NamedChoice):
        if choice.function.name not in names:
            raise ValueError(f"tool_choice.function.name: no tool is named {choice.function.name[:64]!r}")
        choice = choice.function.name
    if choice != "auto" and choice != "none" and not tools:
        raise ValueError("tool_choice asks for a call but no tools were given")
    if len(set(names)) < len(names):
        raise ValueError("tools: two tools have the same name")
    fmt = body.response_format
    schema = None
    if fmt is not None and fmt.type != "text":
        schema = {"schema": fmt.json_schema.schema_ if fmt.type == "json_schema" else None}
    params = replace(params, tools=tuple(tools) if choice != "none" else (), tool_choice=choice,
                     parallel_tool_calls=body.parallel_tool_calls, response_format=schema)
    asked = [name for name, value in (("tools", params.tools), ("response_format", schema),
                                       ("logprobs", body.logprobs or None),
                                       ("presence_penalty", body.presence_penalty),
                                       ("frequency_penalty", body.frequency_penalty),
                                       ("logit_bias", body.logit_bias)) if value]
    if asked:
        llm = check(engine, asked)
        for i, tool in enumerate(tools):
            compiled(llm, tool["function"].get("parameters") or {"type": "object"}, f"tools[{i}].function.parameters")
        if schema is not None and schema["schema"] is not None:
            compiled(llm, schema["schema"], "response_format.json_schema.schema")
    return params


def check(engine, asked: list[str]):
    """The loaded LLM, when it honours every field in `asked`; else ValueError naming the first it does not."""
    llm = engine.llm()
    for name in asked:
        if FEATURE_OF[name] not in llm.features:
            raise ValueError(f"'{name}' is not supported by {llm.name}: it needs a local model whose "
                             "logits this server reads (llm.backend=transformers)"
                             + (" with fill-in-the-middle tokens (e.g. Qwen2.5-Coder)" if name == "suffix" else ""))
    return llm


def compiled(llm, schema, where: str) -> None:
    from engine.llm.structured import compile_schema

    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a JSON Schema must be an object")
    try:
        compile_schema(llm, schema)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
