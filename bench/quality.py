#!/usr/bin/env python3
"""Answer quality of the cpu profile's LLM, through the engine's own path.

60 fixed items (bench/quality_items.json), 15 in each of four groups:
instructions (use the given name, one word, yes/no, a list of three),
facts (a user turn carrying perception facts exactly as the engine formats
them, engine.perception.understand.with_facts: the answer must quote them), knowledge,
memory (2-3 turns of history, then a question about an earlier one).
Each item is scored automatically (all of its checks must pass). For facts
items, a quoted string in the answer that is in no fact counts as "invented".

Each item goes through Engine.answer with the engine's system prompt and the
params the session would use (Engine.params; a turn with facts gets
llm.facts_temperature unless a temperature is set), for each setting:
  default: the config's sampling: the model's own (assets/models.json "sampling"), with
           llm.facts_temperature for turns carrying facts
  greedy:  temperature 0 for every turn
  t0.3, t0.7: that temperature for every turn (a request that sets it), the model's top_p
Prints one JSON object as its last line and writes bench/results/quality-<llm>.json.

    python bench/quality.py [--llm smollm2-135m] [--tokens 48] [--settings default,greedy]
                            [--groups facts] [--layout engine|first|note|repeat]
                            [--threads N] [--set llm.decode=fp32] [--rescore RESULTS.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

ITEMS = json.loads((ROOT / "bench" / "quality_items.json").read_text())
BY_ID = {i["id"]: i for i in ITEMS}
GROUPS = ("instructions", "facts", "knowledge", "memory")
# the temperature passed to Engine.params, as a request's would be (None: the config's, with
# llm.facts_temperature for turns carrying facts)
SETTINGS = {"default": None, "greedy": 0.0, "t0.3": 0.3, "t0.7": 0.7}
QUOTE = re.compile(r'"([^"\n]{2,80})"|“([^”\n]{2,80})”')


def passes(rule: dict, answer: str) -> bool:
    low = answer.lower()
    if "has" in rule:
        return rule["has"].lower() in low
    if "any" in rule:
        return any(a.lower() in low for a in rule["any"])
    if "case" in rule:
        return rule["case"] in answer
    if "re" in rule:
        return re.search(rule["re"], answer, re.I | re.M) is not None
    if "not_re" in rule:  # e.g. the assistant taking the user's name as its own ("I'm Ada")
        return re.search(rule["not_re"], answer, re.I | re.M) is None
    if "max_words" in rule:
        return 0 < len(re.findall(r"[\w'.$-]+", answer)) <= rule["max_words"]
    if "items" in rule:  # a bulleted / numbered list, short items one per line, or "a, b and c" on the first line
        n = rule["items"]
        bullets = re.findall(r"^\s*(?:\d+[.)]|[-*•])\s*\S", answer, re.M)
        lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
        first = lines[0] if lines else ""
        items = lines[1:] if first.endswith(":") else lines  # "Here are three fruits:" then the items
        plain = len(items) >= n and all(len(line.split()) <= 4 and line[-1] not in ":!?" for line in items[:n])
        inline = [c for c in re.split(r",|\band\b", first.split(":")[-1]) if c.strip()]
        short = all(len(c.split()) <= 4 for c in inline)
        return len(bullets) >= n or plain or (len(inline) >= n and short)
    raise ValueError(f"unknown rule {rule}")


def invented(answer: str, facts: dict, turns: list) -> list[str]:
    """Quoted text in the answer that is in no fact (nor in the user's own words)."""
    known = " ".join([*facts.values(), *turns]).lower()
    return [q for m in QUOTE.finditer(answer) for q in m.groups() if q and q.strip().lower() not in known]


def messages_for(item: dict, system_prompt: str, layout) -> list[dict]:
    turns = item["turns"]
    msgs = [{"role": "system", "content": system_prompt}]
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns[:-1])]
    msgs.append({"role": "user", "content": layout(turns[-1], item.get("facts") or {})})
    return msgs


def facts_first(content: str, facts: dict) -> str:
    """A candidate layout: the facts first, an instruction, then the question."""
    if not facts:
        return content
    found = "\n".join(f"[{name} - what the perception tools found: {f}]" for name, f in facts.items())
    return f"{found}\n\nAnswer from these facts; quote text exactly.\n\n{content}"


def facts_note(content: str, facts: dict) -> str:
    """A candidate layout: the engine's, then a short instruction."""
    from engine.perception.understand import with_facts

    return with_facts(content, facts) + ("\n\nAnswer the question from these facts." if facts else "")


def facts_repeat(content: str, facts: dict) -> str:
    """A candidate layout: the engine's, then the question again."""
    from engine.perception.understand import with_facts

    return with_facts(content, facts) + (f"\n\nQuestion: {content}" if facts else "")


def facts_before(content: str, facts: dict) -> str:
    """A candidate layout: the engine's fact lines, but before the question, with no instruction."""
    if not facts:
        return content
    return "".join(f"[{name} - what the perception tools found: {f}]\n\n" for name, f in facts.items()) + content


LAYOUTS = {"first": facts_first, "note": facts_note, "repeat": facts_repeat, "before": facts_before}


def run_setting(engine, temperature, tokens: int, layout, items=ITEMS) -> dict:
    from engine.events import CancelToken

    rows, gen_tokens, gen_s = [], 0, 0.0
    for item in items:
        facts = item.get("facts") or {}
        try:
            params = engine.params(tokens, temperature, facts=bool(facts) or "transcribed:" in item["turns"][-1])
        except TypeError:  # an engine without facts_temperature (before the fix)
            params = engine.params(tokens, temperature)
        msgs = messages_for(item, engine.config.system_prompt, layout)
        start = time.perf_counter()
        stream = engine.answer(msgs, params, CancelToken())
        while True:
            try:
                next(stream)
            except StopIteration as stop:
                answer, usage, _ = stop.value
                break
        gen_s += time.perf_counter() - start
        gen_tokens += usage.get("completion_tokens", 0)
        rows.append({"id": item["id"], "group": item["group"], "temperature": params.temperature, "answer": answer})
        ok = score(rows[-1])
        print(f"{len(rows):2d} {item['id']:18s} {'ok ' if ok else 'BAD'} {answer[:70]!r}", file=sys.stderr, flush=True)
    return summarize(rows, round(gen_tokens / gen_s, 2) if gen_s else None)


def score(row: dict) -> bool:
    item = BY_ID[row["id"]]
    row["ok"] = all(passes(r, row["answer"]) for r in item["check"])
    facts = item.get("facts") or {}
    row["invented"] = invented(row["answer"], facts, item["turns"]) if item["group"] == "facts" else []
    return row["ok"]


def summarize(rows: list[dict], tok_s) -> dict:
    groups = {g: round(sum(r["ok"] for r in rows if r["group"] == g) / sum(r["group"] == g for r in rows), 3)
              for g in GROUPS if any(r["group"] == g for r in rows)}
    return {"overall": round(sum(r["ok"] for r in rows) / len(rows), 3), "groups": groups,
            "passed": sum(r["ok"] for r in rows), "items": len(rows),
            "invented_quotes": sum(len(r["invented"]) for r in rows),
            "answers_with_invented_quotes": sum(bool(r["invented"]) for r in rows),
            "tok_s": tok_s, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="", help="a name from assets/models.json (default: the cpu profile's)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--settings", default="default,greedy")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                    help="any config field, as run_app.py --set (e.g. llm.decode=fp32)")
    ap.add_argument("--layout", choices=("engine", *LAYOUTS), default="engine",
                    help="engine: engine.perception.understand.with_facts; the others: candidate layouts (see LAYOUTS)")
    ap.add_argument("--groups", default=",".join(GROUPS), help="a subset, e.g. facts (for a quick layout check)")
    ap.add_argument("--data-dir", default="/tmp/omni-quality-data", help="the converted model is cached here")
    ap.add_argument("--out", default="", help="default: bench/results/quality-<llm>.json")
    ap.add_argument("--rescore", metavar="JSON", help="score the answers saved in a results file again (no model)")
    args = ap.parse_args()
    if args.rescore:
        result = json.loads(Path(args.rescore).read_text())
        for name, got in result["settings"].items():
            [score(r) for r in got["rows"]]
            result["settings"][name] = summarize(got["rows"], got["tok_s"])
        return report(result, Path(args.out or args.rescore))

    import torch

    from engine.config import load_config
    from engine.engine import Engine
    from engine.perception.understand import with_facts

    if args.threads:
        torch.set_num_threads(args.threads)
    layout = with_facts if args.layout == "engine" else LAYOUTS[args.layout]
    cfg = load_config("cpu", overrides={"data_dir": args.data_dir, "llm": args.llm or None}, sets=args.sets, env={})
    out = Path(args.out or ROOT / "bench" / "results" / f"quality-{cfg.llm.model}.json")
    engine = Engine(cfg)
    try:
        engine.llm()  # load (and convert once) before timing
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                  "llm": cfg.llm.model, "model": engine.llm().name, "max_new_tokens": args.tokens,
                  "layout": args.layout, "facts_temperature": getattr(cfg.llm, "facts_temperature", None),
                  "decode": getattr(cfg.llm, "decode", None), "decode_path": getattr(engine.llm(), "decode_path", None),
                  "sampling": {"temperature": cfg.llm.temperature, "top_p": cfg.llm.top_p,
                               "from_model": list(getattr(cfg.llm, "sampling_from_model", ()))},
                  "settings": {}}
        for name in args.settings.split(","):
            items = [i for i in ITEMS if i["group"] in args.groups.split(",")]
            result["settings"][name] = run_setting(engine, SETTINGS[name], args.tokens, layout, items)
    finally:
        engine.close()
    report(result, out)


def report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {**result, "settings": {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                      for k, v in result["settings"].items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
