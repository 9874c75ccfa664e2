"""What programs expect of an OpenAI-compatible server, through the official `openai` client (and
LangChain's ChatOpenAI): function tools, structured outputs, stop/n/seed/logprobs/penalties,
/v1/completions, /v1/responses, /v1/models/{id}. The tiny seeded model decides nothing a test
relies on: where the model's choice matters (auto) the test accepts either outcome but checks
its shape; `required`, a named tool and the grammar are what the server guarantees."""
from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}}
TAGS = {"type": "function", "function": {
    "name": "tag_photo", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "ok": {"type": "boolean"}},
                  "required": ["lat", "ok"]}}, "required": ["tags", "where"]}}}
TOOLS = [WEATHER, ADD, TAGS]
ASK = [{"role": "user", "content": "What's the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def schema_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t["function"]["name"])
def test_a_named_tool_is_called_with_valid_arguments_streamed_or_not(client, tool):
    name = tool["function"]["name"]
    ask = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
               tool_choice={"type": "function", "function": {"name": name}})
    r = client.chat.completions.create(**ask)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    check_calls(calls)
    assert calls[0].function.name == name
    streamed, finish = {}, None
    for chunk in client.chat.completions.create(**ask, stream=True):
        for part in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            entry = streamed.setdefault(part.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = entry["id"] or part.id
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(streamed.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]  # greedy: the same call


def test_required_always_calls_and_none_never_does(client):
    for _ in range(2):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0.9)
        check_calls(r.choices[0].message.tool_calls)
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=12, temperature=0.9)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")


def test_auto_either_calls_validly_or_answers(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, temperature=0)
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        check_calls(choice.message.tool_calls)
    else:
        assert choice.message.content and not choice.message.tool_calls


def test_a_tool_loop_reads_the_result_back(server, client, answers):
    seen = answers(server.engine)
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]

    def then(result: str):
        history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": result}]
        return client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                              max_tokens=8, temperature=0)

    result = "Sunny, 18 degrees, light wind from the west " * 4
    second = then(result)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    then("x")
    assert seen[-2]["prompt_tokens"] - seen[-1]["prompt_tokens"] >= len(result) // 2  # the result went in


class Person(BaseModel):
    name: str
    age: int
    pets: list[str]


def test_structured_outputs_parse(client):
    parsed = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Invent a person."}],
                                           response_format=Person, max_tokens=200, temperature=0.8)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=200, temperature=0.8)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Invent a person."}], stream=True, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "P", "schema": Person.model_json_schema()}})
        if c.choices)
    Person.model_validate_json(text)


def test_stop_strings_end_the_answer_unshown(client):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=24, temperature=0)
    full = client.chat.completions.create(**ask).choices[0].message.content
    stop = full[10:12]
    assert len(full) > 14 and stop.strip()
    r = client.chat.completions.create(**ask, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **ask, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]


def test_n_seed_logprobs_penalties_and_usage(client):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=1.0)
    r = client.chat.completions.create(**ask, n=3, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each its own draw
    again = client.chat.completions.create(**ask, n=3, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert 3 <= r.usage.completion_tokens <= 30  # (counted over every choice)
    r = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    greedy = dict(ask, temperature=0)
    plain = client.chat.completions.create(**greedy, logprobs=True).choices[0]
    first = plain.logprobs.content[0].token
    tok = server_token_id(client, first)
    biased = client.chat.completions.create(**greedy, logit_bias={str(tok): -100}).choices[0].message.content
    assert not biased.startswith(first)
    penal = client.chat.completions.create(**greedy, frequency_penalty=2.0, presence_penalty=2.0).choices[0]
    assert penal.message.content != plain.message.content
    chunks = list(client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def server_token_id(client, text: str) -> int:
    """The tiny tokenizer's id of one character token (the API takes ids in logit_bias)."""
    from engine.llm.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer().convert_tokens_to_ids(text if text != " " else "Ġ")


@pytest.mark.parametrize("body, said", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                           {"x": {"type": "nonsense"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "no tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"n": 99}, "n"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(server, body, said):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert said in r.json()["error"]["message"] or said in (r.json()["error"]["param"] or "")


def test_a_cancel_mid_call_frees_the_model(server, client):
    big = {"type": "function", "function": {"name": "essay", "parameters": {"type": "object", "properties": {
        "text": {"type": "string"}}, "required": ["text"]}}}
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=[big], tool_choice="required",
                                            max_tokens=3000, stream=True)
    for n, _ in enumerate(stream):
        if n == 4:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while server.engine.model_queue.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.engine.model_queue.locked()


def test_completions_and_models(server, client):
    r = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0, logprobs=2)
    text = r.choices[0].text
    assert text and r.object == "text_completion" and r.usage.completion_tokens <= 8
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    echoed = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "def add(a, b):" + text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == text
    chunks = list(client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=6, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert not chunks[-1].choices and 2 <= chunks[-1].usage.completion_tokens <= 12  # (both choices counted)
    with pytest.raises(openai.BadRequestError, match="suffix"):  # the tiny tokenizer has no FIM tokens
        client.completions.create(model="tiny", prompt="def f(", suffix="\n", max_tokens=4)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_responses_stateful_tool_loop_and_stream(client):
    r = client.responses.create(model="tiny", input="What's the weather in Paris right now?", temperature=0,
                                tools=[{"type": "function", **WEATHER["function"]}], tool_choice="required",
                                max_output_tokens=120)
    call = next(item for item in r.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    follow = client.responses.create(model="tiny", previous_response_id=r.id, max_output_tokens=8, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 18 C"}])
    assert follow.output_text and follow.status in ("completed", "incomplete")
    assert client.responses.retrieve(follow.id).output_text == follow.output_text
    kinds, text = [], ""
    for event in client.responses.create(model="tiny", input="hi", stream=True, max_output_tokens=8, temperature=0):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and text
    shaped = client.responses.create(model="tiny", input="Invent a person.", max_output_tokens=200,
                                     text={"format": {"type": "json_schema", "name": "P",
                                                      "schema": Person.model_json_schema()}})
    Person.model_validate_json(shaped.output_text)
    client.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)
    # a bad input item is named in the Responses request's own terms, not the chat request it becomes
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]\.role must be one of user"):
        client.responses.create(model="tiny", input=[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]\.content must be a string or a list"):
        client.responses.create(model="tiny", input=[{"role": "user", "content": 5}])


def test_langchain_drives_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=160,
                     max_retries=0)
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What's the weather in Paris?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(called.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(person, Person)


def test_an_answer_reads_calls_and_results_as_notes():
    """A small model shown its calls and their results in its tool format writes the call again
    as JSON; the answer's prompt folds each call and result into the question as a note."""
    from engine.llm.tool_calls import as_facts

    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    assert as_facts(convo) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content":
                               'Weather in Paris?\n\n[get_weather({"city": "Paris"}) returned: 18 C, sunny]'}]
    assert as_facts(convo[:2]) == convo[:2]
