"""Function calling (OpenAI's `tools`) on a local model whose logits we can read and mask.

The prompt: the model's own tool format where its chat template has one (Qwen2.5's: the
tools' JSON in the system turn, a call as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
results as `<tool_response>` in a user turn); for a template without one, the same format
written into the system prompt here, with calls and results as plain text turns.

Whether to call ("auto"; "required" or a named tool skip the question): a small model's
own first token is no guide (Qwen2.5-0.5B writes the call as a JSON code block, or
JSON for a joke with a weather tool on offer). What is: how much more likely the request
becomes once a tool is named (pointwise mutual information, `backend.score`): "Add 17
and 25" is far likelier from a user of add(a, b) than from any user; "Tell me a joke"
is not. The model calls when some tool makes the request likelier (bench/function_calling.py
measures it). After a tool's result, it answers, unless it opens a call itself.

The turn, on the model's KV cache (`backend.steps`: a driven sequence of the scheduler's
batch on the fast path):
- which tool: the one named, the only one, or the most likely of the names (each scored on
  the cache, then rewound), as the router chooses (structured.choose);
- the arguments: decoded under the grammar of that tool's JSON Schema, so every call parses
  and validates, streamed as they come;
- then another call, when parallel calls are allowed and the model opens one.
When the model answers instead, the caller decodes its answer with the call's opener
suppressed.
"""
from __future__ import annotations

import json
from typing import Generator, Sequence

from engine.events import CancelToken, ToolCallDelta

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
MAX_CALLS = 4  # calls in one turn when parallel calls are allowed
RESULT = "<tool_response>"  # a tool's result, as a user turn where the template has no tool role
# the decision's two readings of the request (wants_a_call)
ANY_USER = "A user asks an assistant:\n"
TOOL_USER = "A user asks an assistant that can run the function {signature}, to run it:\n"
SCORED_TOKENS = 48  # of the request (its start says what it wants)
MARGIN = 0.0  # nats: likelier at all
TOOLS_NOTE = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)  # (Qwen2.5's own words, for a template that has no tool format)


def native(tokenizer) -> bool:
    """The chat template renders tools, calls and results itself."""
    source = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(source, str) and "tools" in source and "tool_call" in source


def template_messages(messages: Sequence[dict], tools: Sequence[dict], own_format: bool) -> list[dict]:
    """OpenAI's conversation as the chat template reads it. An assistant turn's `tool_calls`
    carry their arguments as a JSON string; templates want the object. A template without a
    tool format reads the tools in the system turn, calls as text, results as user turns."""
    out = []
    for m in messages:
        calls = [c.get("function", c) for c in m.get("tool_calls") or ()]
        calls = [{"name": c.get("name", ""), "arguments": _as_object(c.get("arguments"))} for c in calls]
        content = m.get("content") or ""
        if own_format:
            out.append({**m, "content": content, **({"tool_calls": calls} if calls else {})})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": result_text(content)})
        elif calls:
            out.append({"role": "assistant", "content": (content + calls_text(calls)).strip()})
        else:
            out.append({"role": m["role"], "content": content})
    if tools and not own_format:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + TOOLS_NOTE.format(tools=listed)}
        else:
            out.insert(0, {"role": "system", "content": TOOLS_NOTE.format(tools=listed).lstrip()})
    return out


def calls_text(calls: Sequence[dict]) -> str:
    """Calls ({"name", "arguments"}) as the model writes them (stored where a turn holds text only)."""
    return "".join(f"\n{OPEN}{json.dumps({'name': c['name'], 'arguments': _as_object(c['arguments'])}, ensure_ascii=False)}"
                   f"{CLOSE}" for c in calls)


def result_text(content: str) -> str:
    """A tool's result as a user turn's text."""
    return f"{RESULT}\n{content}\n</tool_response>"


def _as_object(arguments) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        return {"value": arguments}
    return value if isinstance(value, dict) else {"value": value}


def opener(tokenizer) -> int:
    """The first token of a call (Qwen's `<tool_call>` is one token)."""
    return tokenizer(OPEN, add_special_tokens=False).input_ids[0]


def wants_a_call(backend, request: str, tools: dict) -> bool:
    """Does some tool make the request likelier than it is from any user (see the module's note)?"""
    ids = lambda text: backend.encode(text)  # noqa: E731  (a raw prompt: no chat template)
    asked = ids(request)[:SCORED_TOKENS]
    if not asked:
        return False

    def likelihood(prefix: str) -> float:
        head = ids(prefix)
        return backend.score(head + asked, len(head))

    alone = likelihood(ANY_USER)
    return any(likelihood(TOOL_USER.format(signature=signature(name, spec))) > alone + MARGIN
               for name, spec in tools.items())


def signature(name: str, spec: dict) -> str:
    props = (spec.get("parameters") or {}).get("properties") or {}
    described = f": {' '.join(str(spec.get('description', '')).split())[:200]}" if spec.get("description") else ""
    return f"{name}({', '.join(list(props)[:12])}){described}"


def tool_turn(backend, messages: Sequence[dict], prompt: list[int], params, cancel: CancelToken
              ) -> Generator[ToolCallDelta, None, dict | None]:
    """The calls the model makes after `prompt` (streamed as ToolCallDelta: the name first, then
    fragments of the arguments), and the usage (finish_reason "tool_calls", or "length" when
    the budget ended inside a call, "cancelled"). None when the model answers instead."""
    import torch

    from engine.llm.decoding import Detokenizer
    from engine.llm.structured import Grammar, constrained

    tok = backend.tokenizer
    tools = {t["function"]["name"]: t["function"] for t in params.tools}
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "finish_reason": "tool_calls", "tool_calls": 0}
    budget = params.max_new_tokens
    with torch.inference_mode():
        steps = backend.steps(prompt)
        try:
            if params.tool_choice == "auto" and int(steps.logits.argmax(-1)) != opener(tok):
                last = messages[-1] if messages else {}
                said = _text(last.get("content"))
                if last.get("role") != "user" or said.lstrip().startswith(RESULT) or \
                        not wants_a_call(backend, said, tools):
                    return None
            for index in range(MAX_CALLS if params.parallel_tool_calls else 1):
                if index and not _opens_another(steps, ids, backend.stop_ids, opener(tok)):
                    break
                name = _name(steps, ids, tools, params.tool_choice)
                spent = _push(steps, ids(f'{OPEN}{{"name": "') + ids(f'{name}", "arguments": '))
                usage["completion_tokens"] += spent
                usage["tool_calls"] += 1
                yield ToolCallDelta(index, name, "")
                left = max(1, budget - usage["completion_tokens"])
                grammar = Grammar(backend, tools[name].get("parameters") or {"type": "object"}, left)
                detok, taken = Detokenizer(tok), 0
                for token in constrained(steps, grammar, left, cancel):
                    taken += 1
                    if text := detok.push(token):
                        yield ToolCallDelta(index, "", text)
                if text := detok.flush():
                    yield ToolCallDelta(index, "", text)
                usage["completion_tokens"] += taken
                if cancel.cancelled:
                    usage["finish_reason"] = "cancelled"
                    break
                if not grammar.done:
                    usage["finish_reason"] = "length"
                    break
                usage["completion_tokens"] += _push(steps, ids("}" + CLOSE))
        finally:
            steps.close()
    return usage


def _push(steps, tokens: list[int]) -> int:
    for token in tokens:
        steps.push(token)
    return len(tokens)


def _opens_another(steps, ids, stop_ids, open_id: int) -> bool:
    """After a call: does the model open another (rather than end its turn)?"""
    if int(steps.logits.argmax(-1)) in stop_ids:
        return False
    _push(steps, ids("\n"))
    return int(steps.logits.argmax(-1)) == open_id


def _name(steps, ids, tools: dict, choice: str) -> str:
    """The tool to call: the one asked for, the only one, or the most likely of the names (each
    scored on the cache after the call's opening, then rewound)."""
    if choice in tools:
        return choice
    if len(tools) == 1:
        return next(iter(tools))
    import torch

    start = steps.length
    _push(steps, ids(f'{OPEN}{{"name": "'))
    after, base, scores = steps.length, steps.logits, {}
    for name in tools:
        option = ids(f'{name}"')
        logits, score = base, 0.0
        for token in option:
            score += float(torch.log_softmax(logits[0].float(), -1)[token])
            logits = steps.push(token)
        steps.rewind(after)
        scores[name] = score
    steps.rewind(start)
    return max(scores, key=scores.get)


def _text(content) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
