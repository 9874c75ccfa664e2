#!/usr/bin/env python3
"""Function calling and structured outputs through the OpenAI API, on the cpu profile's model.

 (a) validity: for each of the schemas below (nested objects, enums, arrays, numbers with
     bounds, booleans, optional fields) one forced tool call and one json_schema answer;
     the share that parse and validate (jsonschema), beside the same model asked in text
     for the same JSON with no grammar (the plain alternative);
 (b) decision: on a fixed set of (request, tools) pairs, half needing a call and half not,
     how often `tool_choice: auto` decides right, beside the same model prompted with the
     same tools and left to write freely (it called if its answer holds a <tool_call>);
 (c) cost: decode tok/s under a grammar (a json_schema answer) vs free text, same prompt.
All through the official `openai` client against the app's own server, in one run.
Prints one JSON object as its last line and writes bench/results/function_calling.json.

    python bench/function_calling.py [--llm NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni-assistant" / "bench-serving"


def obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(required if required is not None else props)}


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
SCHEMAS = {
    "get_weather": (obj({"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}),
                    "What's the weather in Paris right now, in celsius?"),
    "add": (obj({"a": I, "b": I}), "Add 17 and 25."),
    "set_timer": (obj({"minutes": {"type": "integer", "minimum": 1, "maximum": 180}, "label": S}),
                  "Set a 10 minute timer for the pasta."),
    "send_email": (obj({"to": S, "subject": S, "body": S}), "Email bob@example.com that I'll be late to the meeting."),
    "book_flight": (obj({"from": S, "to": S, "date": S, "passengers": {"type": "integer", "minimum": 1, "maximum": 9}}),
                    "Book a flight from Boston to Denver on 2027-01-12 for 2 people."),
    "stock_price": (obj({"ticker": {"type": "string", "maxLength": 5}}), "What is AAPL trading at?"),
    "translate": (obj({"text": S, "target": {"type": "string", "enum": ["fr", "de", "es", "it", "ja"]}}),
                  "Translate 'good morning' into German."),
    "search_web": (obj({"query": S, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}),
                   "Search the web for the best hiking trails near Seattle."),
    "create_event": (obj({"title": S, "start": S, "duration_min": {"type": "integer", "minimum": 5, "maximum": 480},
                          "attendees": {"type": "array", "items": S, "maxItems": 5}}),
                     "Put a 30 minute design review with Ana and Raj on my calendar tomorrow at 3pm."),
    "convert_units": (obj({"value": N, "from_unit": {"type": "string", "enum": ["km", "mi", "kg", "lb"]},
                           "to_unit": {"type": "string", "enum": ["km", "mi", "kg", "lb"]}}),
                      "How many miles is 42 km?"),
    "order_pizza": (obj({"size": {"type": "string", "enum": ["small", "medium", "large"]},
                         "toppings": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                         "delivery": B}),
                    "Order a large pizza with mushrooms and olives, delivered."),
    "set_thermostat": (obj({"celsius": {"type": "number", "minimum": 10, "maximum": 30}, "room": S}),
                       "Set the living room to 21 degrees."),
    "play_music": (obj({"artist": S, "shuffle": B, "volume": {"type": "integer", "minimum": 0, "maximum": 100}}),
                   "Play some Miles Davis on shuffle at volume 40."),
    "create_user": (obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "address": obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
                    "Create a user Maria Lopez, 34, living at 12 Oak St, Springfield 62704."),
    "rate_movie": (obj({"title": S, "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "review": S}),
                   "Give Inception 5 stars with a one-line review."),
    "reminder": (obj({"text": S, "when": S, "repeat": {"type": "string", "enum": ["none", "daily", "weekly"]}}),
                 "Remind me to water the plants every week on Sunday morning."),
    "currency": (obj({"amount": {"type": "number", "exclusiveMinimum": 0}, "from": {"type": "string", "maxLength": 3},
                      "to": {"type": "string", "maxLength": 3}}),
                 "Convert 250 US dollars to euros."),
    "shopping_list": (obj({"items": {"type": "array", "items": obj({"name": S, "qty": {"type": "integer", "minimum": 1}}),
                                     "minItems": 1, "maxItems": 6}}),
                      "Add 2 cartons of milk and 12 eggs to my shopping list."),
    "route": (obj({"origin": S, "destination": S, "mode": {"type": "string", "enum": ["car", "bike", "walk", "transit"]},
                   "avoid_tolls": B}),
              "Directions from the station to the museum by bike."),
    "lookup_order": (obj({"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"}}),
                     "Where is my order AB123456?"),
    "sql_query": (obj({"table": {"type": "string", "enum": ["users", "orders", "products"]},
                       "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                       "filters": {"type": "array", "items": obj({"column": S, "op": {"type": "string",
                                                                   "enum": ["=", "<", ">"]}, "value": S})}}),
                  "Show me the first 10 orders over 100 dollars."),
    "resize_image": (obj({"width": {"type": "integer", "minimum": 16, "maximum": 4096},
                          "height": {"type": "integer", "minimum": 16, "maximum": 4096}, "keep_aspect": B}),
                     "Resize the image to 800 by 600, keeping the aspect ratio."),
    "call_contact": (obj({"name": S, "video": B}), "Video call my sister Emma."),
    "log_workout": (obj({"activity": {"type": "string", "enum": ["run", "swim", "cycle", "lift"]},
                         "minutes": {"type": "integer", "minimum": 1}, "distance_km": N}, ["activity", "minutes"]),
                    "Log a 45 minute run, 8.5 km."),
    "recipe_search": (obj({"ingredients": {"type": "array", "items": S, "minItems": 1},
                           "vegetarian": B, "max_minutes": {"type": "integer", "minimum": 5, "maximum": 240}}),
                      "Find a vegetarian recipe with chickpeas and spinach under 30 minutes."),
    "light_control": (obj({"room": S, "on": B, "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                           "color": {"type": "string", "enum": ["warm", "cool", "red", "blue"]}}),
                      "Dim the bedroom lights to 20 percent, warm."),
    "ticket": (obj({"title": S, "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                    "labels": {"type": "array", "items": {"type": "string", "enum": ["bug", "ui", "backend", "docs"]}}}),
               "File a high priority bug: the login button does nothing on mobile."),
    "geo": (obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                 "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
            "Show the map at latitude 48.85, longitude 2.35."),
    "split_bill": (obj({"total": {"type": "number", "minimum": 0}, "people": {"type": "integer", "minimum": 1},
                        "tip_percent": {"type": "integer", "minimum": 0, "maximum": 40}}),
                   "Split a 120 dollar bill between 4 people with 15 percent tip."),
    "package": (obj({"sender": obj({"name": S, "city": S}), "recipient": obj({"name": S, "city": S}),
                     "weight_kg": {"type": "number", "minimum": 0.1, "maximum": 30}, "express": B}),
                "Ship a 2 kg package from Ana in Lisbon to Tom in Oslo, express."),
    "poll": (obj({"question": S, "options": {"type": "array", "items": S, "minItems": 2, "maxItems": 4}}),
             "Make a poll asking the team pizza or tacos for Friday lunch."),
    "alarm": (obj({"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                   "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                   "days": {"type": "array", "items": {"type": "string", "enum": ["mon", "tue", "wed", "thu", "fri", "sat",
                                                                                  "sun"]}}}),
              "Wake me at 6:45 on weekdays."),
}
DESCRIPTIONS = {  # what a client says of each tool (OpenAI's `description`)
    "get_weather": "Get the current weather in a city", "add": "Add two integers",
    "set_timer": "Start a countdown timer", "send_email": "Send an email", "book_flight": "Book a flight",
    "stock_price": "Get the latest price of a stock by its ticker", "translate": "Translate text into another language",
    "search_web": "Search the web", "create_event": "Create a calendar event",
    "convert_units": "Convert a value between units", "order_pizza": "Order a pizza for delivery or pickup",
    "set_thermostat": "Set a room's thermostat", "play_music": "Play music", "create_user": "Create a user account",
    "rate_movie": "Rate and review a movie", "reminder": "Create a reminder",
    "currency": "Convert an amount between currencies", "shopping_list": "Add items to the shopping list",
    "route": "Get directions between two places", "lookup_order": "Look up an order's delivery status",
    "sql_query": "Query the shop's database", "resize_image": "Resize the current image",
    "call_contact": "Call a contact", "log_workout": "Log a workout", "recipe_search": "Find recipes",
    "light_control": "Control the lights in a room", "ticket": "File an issue ticket",
    "geo": "Show a map at a position", "split_bill": "Split a bill between people",
    "package": "Ship a package", "poll": "Create a poll for the team", "alarm": "Set an alarm",
}
# requests that need no tool (asked with two of the tools above on offer)
NO_CALL = ["Tell me a joke about cats.", "What is the capital of Italy?", "Write a haiku about autumn leaves.",
           "Thanks, that's all!", "Explain what recursion is in one sentence.", "Hi there, how are you?",
           "Who wrote Pride and Prejudice?", "What does HTTP stand for?", "Give me a synonym for happy.",
           "Why is the sky blue?", "Say something nice about Mondays.", "What is 2 plus 2?",
           "Summarize the plot of Romeo and Juliet in one line.", "How do I say thank you in French?",
           "What's your name?", "Can you explain what a noun is?", "Is a tomato a fruit?",
           "Write a short motivational quote.", "What color do you get by mixing blue and yellow?",
           "Describe the ocean in five words.", "How many legs does a spider have?", "Define photosynthesis briefly."]


# written after the decision rule was chosen, never tuned against: (request, tools on offer, needs a call)
HELDOUT = [
    ("Turn off the kitchen lights.", ["light_control", "play_music"], True),
    ("Can you tell me how cold it is in Toronto today?", ["get_weather", "search_web"], True),
    ("Wake me up at 7 tomorrow.", ["alarm", "reminder"], True),
    ("Send Maria an email saying the report is ready.", ["send_email", "call_contact"], True),
    ("What's 12 euros in yen?", ["currency", "convert_units"], True),
    ("Ring my dad.", ["call_contact", "send_email"], True),
    ("Put bread and butter on the shopping list.", ["shopping_list", "order_pizza"], True),
    ("How is TSLA doing right now?", ["stock_price", "search_web"], True),
    ("Track order QZ998877 for me.", ["lookup_order", "ticket"], True),
    ("I just swam for 30 minutes, log it.", ["log_workout", "reminder"], True),
    ("Make the photo 1024 pixels wide and 768 high.", ["resize_image", "geo"], True),
    ("Translate 'where is the station' to Italian.", ["translate", "search_web"], True),
    ("What rhymes with orange?", ["translate", "search_web"], False),
    ("Good night!", ["alarm", "light_control"], False),
    ("Explain the difference between weather and climate.", ["get_weather", "search_web"], False),
    ("Write a limerick about a frog.", ["poll", "send_email"], False),
    ("What is the boiling point of water?", ["convert_units", "get_weather"], False),
    ("Who painted the Mona Lisa?", ["search_web", "rate_movie"], False),
    ("I feel a bit tired today.", ["reminder", "play_music"], False),
    ("What's the plural of mouse?", ["translate", "add"], False),
    ("Tell me about the history of pizza.", ["order_pizza", "recipe_search"], False),
    ("How does a thermostat work?", ["set_thermostat", "search_web"], False),
]


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": DESCRIPTIONS[name],
                                             "parameters": SCHEMAS[name][0]}}


def validity(client, model: str) -> dict:
    import jsonschema

    ok = {"tool_call": 0, "json_schema": 0, "plain_prompt": 0}
    failures = []
    for name, (schema, ask) in SCHEMAS.items():
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": ask}], tools=[tool(name)],
                                           tool_choice={"type": "function", "function": {"name": name}},
                                           max_tokens=200, temperature=0)
        ok["tool_call"] += _valid(jsonschema, r.choices[0].message.tool_calls[0].function.arguments
                                  if r.choices[0].message.tool_calls else "", schema)
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": ask}], max_tokens=200,
                                           temperature=0, response_format={"type": "json_schema", "json_schema": {
                                               "name": name, "schema": schema}})
        good = _valid(jsonschema, r.choices[0].message.content, schema)
        ok["json_schema"] += good
        if not good:
            failures.append(name)
        plain = client.chat.completions.create(model=model, max_tokens=200, temperature=0, messages=[
            {"role": "system", "content": "Reply with a single JSON object only, following this JSON Schema: "
                                          + json.dumps(schema)}, {"role": "user", "content": ask}])
        ok["plain_prompt"] += _valid(jsonschema, _json_in(plain.choices[0].message.content), schema)
    n = len(SCHEMAS)
    return {"schemas": n, "valid_tool_calls": round(ok["tool_call"] / n, 3),
            "valid_json_schema_answers": round(ok["json_schema"] / n, 3),
            "valid_plain_prompted": round(ok["plain_prompt"] / n, 3), "invalid": failures}


def _json_in(text: str) -> str:
    """The JSON in a free answer (a fenced block, or the text from its first brace)."""
    text = text.strip()
    if "```" in text:
        text = text.split("```")[1].removeprefix("json").strip()
    return text[text.find("{"):] if "{" in text else text


def _valid(jsonschema, text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def decision(client, model: str, heldout: bool = False) -> dict:
    names = list(SCHEMAS)
    pairs = [(ask, [names[i], names[(i + 7) % len(names)]], True) for i, (_, (_, ask)) in enumerate(SCHEMAS.items())]
    pairs = pairs[:len(NO_CALL)] + [(ask, [names[(3 * i) % len(names)], names[(3 * i + 5) % len(names)]], False)
                                    for i, ask in enumerate(NO_CALL)]
    pairs = HELDOUT if heldout else pairs
    right = {"auto": 0, "plain_prompted": 0}
    wrong = []
    for ask, offered, needs in pairs:
        tools = [tool(n) for n in offered]
        messages = [{"role": "user", "content": ask}]
        r = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=160, temperature=0)
        called = bool(r.choices[0].message.tool_calls)
        right["auto"] += called == needs
        if called != needs:
            wrong.append(ask)
        # the plain alternative: the model sees the same tools in its prompt and writes freely
        text = client.completions.create(model=model, prompt=_tool_prompt(offered, ask), max_tokens=40,
                                         temperature=0).choices[0].text
        right["plain_prompted"] += _calls(text, offered) == needs
    n, pre = len(pairs), "heldout_" if heldout else ""
    return {f"{pre}pairs": n, f"{pre}needing_a_call": sum(p[2] for p in pairs),
            f"{pre}auto_right": round(right["auto"] / n, 3),
            f"{pre}plain_prompted_right": round(right["plain_prompted"] / n, 3), f"{pre}auto_wrong": wrong}


def _calls(text: str, offered: list[str]) -> bool:
    """A free answer that calls: Qwen's <tool_call>, or JSON naming an offered tool (in a code block or not)."""
    return "<tool_call>" in text or ('"name"' in text and any(f'"{n}"' in text for n in offered))


def _tool_prompt(offered: list[str], ask: str) -> str:
    """The chat template's own tool prompt, as text (for /v1/completions)."""
    from engine.llm.tool_calls import TOOLS_NOTE

    listed = "\n".join(json.dumps(tool(n)) for n in offered)
    return (f"<|im_start|>system\nYou are a helpful assistant.{TOOLS_NOTE.format(tools=listed)}<|im_end|>\n"
            f"<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n")


def cost(client, model: str, rounds: int = 3) -> dict:
    ask = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
    schema = obj({"title": S, "story": S})

    def rate(**extra) -> float:
        first, n = None, 0
        for chunk in client.chat.completions.create(model=model, messages=ask, max_tokens=128, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}, **extra):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        end = time.perf_counter()
        return (n - 1) / (end - first) if first and n > 1 else 0.0

    shaped = {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}}}
    runs = [(rate(), rate(**shaped)) for _ in range(rounds)]  # interleaved: the same load on both
    free, grammar = round(max(r[0] for r in runs), 2), round(max(r[1] for r in runs), 2)
    return {"free_tok_s": free, "grammar_tok_s": grammar, "grammar_vs_free": round(grammar / free, 3) if free else None}


def main() -> None:
    import openai

    from app.server import Server
    from bench.serving import free_port
    from engine.config import load_config
    from engine.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default=None)
    parser.add_argument("--decision-only", action="store_true",
                        help="only the decision (both sets of pairs), over the last full run's figures")
    args = parser.parse_args()
    cfg = load_config("cpu", overrides={"data_dir": str(DATA), "llm": args.llm, "port": str(free_port()),
                                        "max_new_tokens": "256"}, env={})
    engine = Engine(cfg)
    engine.start_loading().join()
    server = Server(engine).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = cfg.llm.model
    out = ROOT / "bench" / "results" / "function_calling.json"
    try:
        if args.decision_only:
            result = {**json.loads(out.read_text()), **decision(client, model), **decision(client, model, heldout=True),
                      "decision_when": time.strftime("%Y-%m-%d %H:%M")}
        else:
            result = {"llm": engine.llm().name, "machine": _machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
                      **validity(client, model), **decision(client, model), **decision(client, model, heldout=True),
                      **cost(client, model)}
    finally:
        client.close()
        server.close()
        engine.close()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
