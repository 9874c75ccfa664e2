"""Function calling (OpenAI's `tools`) on a local model whose logits we can read and mask.

The prompt: the model's own tool format where its chat template has one (Qwen2.5's: the
tools' JSON in the system turn, a call as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
results as `<tool_response>` in a user turn); for a template without one, the same format
written into the system prompt here, with calls and results as plain text turns.

Whether to call ("auto"; "required" or a named tool skip the question): the model's own
words under its own tool prompt. A small model seldom opens the template's `<tool_call>`
(Qwen2.5-0.5B writes the call as a JSON code block, or bare JSON), so it is let write,
greedily, until it shows what it does: a call once it names an offered tool in JSON
(`"name": "get_weather"`), an answer as soon as its text cannot start a call (MAX_LOOK
tokens at most; then it is rewound). bench/function_calling.py measured the alternatives:
this reads right 0.91 of the time on two sets, where the first token alone read 0.50 and
the request's likelihood with and without each tool 0.91 on the set it was tuned on but
0.68 on a held-out one. After a tool's result, the model answers unless it opens a call.

The turn, on the model's KV cache (`backend.steps`: a driven sequence of the scheduler's
batch on the fast path):
- which tool: the one the model named, the one asked for, the only one, or the most likely
  of the names (each scored on the cache, then rewound), as the router chooses;
- the arguments: decoded under the grammar of that tool's JSON Schema, so every call parses
  and validates, streamed as they come;
- then another call, when parallel calls are allowed and the model opens one.
When the model answers instead, the caller decodes its answer with the call's opener
suppressed.
"""
from __future__ import annotations

import json
import re
from typing import Generator, Sequence

from engine.events import CancelToken, ToolCallDelta

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
MAX_CALLS = 4  # calls in one turn when parallel calls are allowed
RESULT = "<tool_response>"  # a tool's result, as a user turn where the template has no tool role
MAX_LOOK = 40  # tokens the model may write before it has shown whether it calls
CALL_STARTS = ("<tool_call>", "```", "{", "[")  # how a small model's call begins
NAMED = re.compile(r'"name"\s*:\s*"([^"]{1,64})"')
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


def as_facts(messages: Sequence[dict]) -> list[dict]:
    """The conversation for an answer (not a call): each call and its result folded into the
    user turn that asked, as a note of what was found ("[get_weather({"city": "Paris"}) returned:
    18 C, sunny]"), the way perception facts are given. A small model answers from such a note;
    shown the calls and results in its tool format, it writes the call again as JSON."""
    out: list[dict] = []
    names: dict[str, str] = {}
    for m in messages:
        calls = m.get("tool_calls") or ()
        if m.get("role") == "assistant" and calls:
            for c in calls:
                fn = c.get("function", c)
                names[c.get("id", "")] = f"{fn.get('name', '')}({json.dumps(_as_object(fn.get('arguments')))})"
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
            continue
        if m.get("role") == "tool":
            note = f"[{names.get(m.get('tool_call_id', ''), 'a tool')} returned: {m.get('content') or ''}]"
            if out and out[-1]["role"] == "user":
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{note}"}
            else:
                out.append({"role": "user", "content": note})
            continue
        out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
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


def written_call(steps, tok, stop_ids, open_id: int, tools: dict) -> str | None:
    """The tool the model calls when let write freely (greedy), or None when it answers; the
    cache is rewound to where it was (see the module's note)."""
    from engine.llm.decoding import Detokenizer

    start, detok, text, opened = steps.length, Detokenizer(tok), "", False
    try:
        for _ in range(MAX_LOOK):
            token = int(steps.logits.argmax(-1))
            if token in stop_ids:
                return None
            opened = opened or token == open_id
            text += detok.push(token)
            head = text.lstrip()
            if not opened and head and not any(head.startswith(c) or c.startswith(head) for c in CALL_STARTS):
                return None  # an answer: its words cannot start a call
            if found := NAMED.search(text):
                return found.group(1) if found.group(1) in tools else None
            steps.push(token)
        return None
    finally:
        steps.rewind(start)


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
    budget, open_id = params.max_new_tokens, opener(tok)
    with torch.inference_mode():
        steps = backend.steps(prompt)
        try:
            choice = params.tool_choice
            if choice == "auto" and int(steps.logits.argmax(-1)) != open_id:
                last = messages[-1] if messages else {}
                if last.get("role") != "user" or _text(last.get("content")).lstrip().startswith(RESULT):
                    return None  # a tool's result: the model answers from it
                choice = written_call(steps, tok, backend.stop_ids, open_id, tools)
                if choice is None:
                    return None
            for index in range(MAX_CALLS if params.parallel_tool_calls else 1):
                if index and not _opens_another(steps, ids, backend.stop_ids, open_id):
                    break
                name = _name(steps, ids, tools, choice if index == 0 else "auto")
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
