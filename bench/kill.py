#!/usr/bin/env python3
"""SIGKILL durability (issue 25 item 4): the server killed at random moments while conversations stream.

Each round starts the app (`run_app.py --profile P`) on the SAME data dir, times it until its model
is ready, and streams at once: Responses API conversations (stored, each turn following the last
completed one by `previous_response_id`), a page conversation through the page's Gradio event
(`/respond`) and a CLI one (`run_app.py chat --conversation ID`, one child at a time: it holds a
model of its own). At a seeded moment (before any token, mid-stream, right after a completion, at
a random time) the server and the CLI child get SIGKILL. A turn is completed when its client saw
it end: `response.completed`, the page's last update (drawn from the store), the CLI's `done`.

After each kill `check` opens the database directly: integrity and foreign-key checks; every
completed turn stored with exactly the text its client saw (else lost); every stored answer whole.
Whole, from the code that writes them: engine/session.py `_commit` inserts an answer once, after it
ended, with its status (complete | interrupted | error) and what ended it; app/responses_api.py
`finished` stores a response once, finished and not failed. Half-written is then: a status that
does not match the ending, an answer that follows no user turn, two answers to one user turn, text
other than what its client saw (equal if it saw the end, else starting with what it saw); a
response not completed/incomplete, whose output is not its stored message, or whose previous one is
not stored. A user turn without answer is by design (stored before its answer): counted, not
flagged. After each start the responses completed before it are read back with GET /v1/responses.

    python bench/kill.py [--kills 100] [--profile cpu] [--seed 0] [--out bench/results/kill.json]
prints one JSON object as its last line and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import DATA as SERVING_DATA, QUESTIONS, free_port  # noqa: E402 (a stdlib-only import)

MODES = ("before_token", "mid_stream", "after_completion", "random_time")
# per profile: bounds on a start and on the wait for a kill moment, how late a random kill comes,
# answer length, clients of each kind
PROFILES = {"tiny": dict(start_s=180, wait_s=40, random_s=3.0, tokens=32, api=2, page=1, cli=1),
            "cpu": dict(start_s=300, wait_s=150, random_s=20.0, tokens=32, api=2, page=1, cli=1)}
CHAIN = 6  # turns of a conversation after which its client starts another in the next round
JOIN_S = 30  # how long a client may take to notice the server is gone
META = '\n\n<span class="turn-meta">'  # where the page's drawing of a stored answer ends its text


@dataclass
class Seen:  # one turn a client sent, and what it saw of the answer
    kind: str  # api | page | cli
    ask: str  # the user's message (unique: it finds the turn in the store)
    round: int
    text: str = ""
    complete: bool = False
    rid: str = ""  # api: the response
    cid: str = ""  # page, cli: the conversation
    turn_id: int = 0  # cli: the stored answer (its done event)


@dataclass
class Chain:  # a client's conversation across rounds: where its next turn goes
    previous: str = ""  # api: the last completed response; page, cli: the conversation
    turns: int = 0


class Ledger:
    """Every turn sent and what its client saw of it; the killer waits on `cond`."""

    def __init__(self) -> None:
        self.turns: list[Seen] = []
        self.errors: list[str] = []
        self.tokens = 0  # updates seen (a delta, a redraw)
        self.completed: Counter = Counter()
        self.cond = threading.Condition()

    def begin(self, kind: str, rnd: int) -> Seen:
        with self.cond:
            n = len(self.turns)
            self.turns.append(Seen(kind, f"k{rnd}-{kind}{n}: {QUESTIONS[n % len(QUESTIONS)]}", rnd))
            return self.turns[-1]

    def show(self, seen: Seen, text: str) -> None:
        with self.cond:
            if text != seen.text:
                seen.text, self.tokens = text, self.tokens + 1
                self.cond.notify_all()

    def done(self, seen: Seen, text: str, chain: Chain, ref: str, **more) -> None:
        with self.cond:
            seen.text, seen.complete = text, True
            for k, v in more.items():
                setattr(seen, k, v)
            chain.previous, chain.turns = ref, chain.turns + 1
            self.completed[seen.kind] += 1
            self.cond.notify_all()

    def error(self, what: str) -> None:
        with self.cond:
            self.errors.append(what[:300])


def output_text(response: dict) -> str:
    return "".join(p["text"] for o in response.get("output", []) if o["type"] == "message" for p in o["content"])


# ---- the clients: each sends turns until `stop`, and returns quietly when the server is gone ----

def api_client(url: str, chain: Chain, ledger: Ledger, stop: threading.Event, rnd: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            seen = ledger.begin("api", rnd)
            body = {"model": "default", "input": seen.ask, "stream": True, "store": True,
                    "previous_response_id": chain.previous or None}
            try:
                with http.stream("POST", "/v1/responses", json=body) as r:
                    if r.status_code != 200:
                        ledger.error(f"api {r.status_code} (after {chain.previous}): {r.read()[:200]!r}")
                        chain.previous, chain.turns = "", 0
                        return
                    for line in r.iter_lines():
                        ev = json.loads(line[6:]) if line.startswith("data: ") else {}
                        kind = ev.get("type")
                        if kind == "response.output_text.delta":
                            ledger.show(seen, seen.text + ev["delta"])
                        elif kind in ("response.completed", "response.incomplete"):
                            rid = ev["response"]["id"]
                            ledger.done(seen, output_text(ev["response"]), chain, rid, rid=rid)
                        elif kind in ("response.failed", "error"):
                            ledger.error(f"api: {line[:200]}")
            except (httpx.TransportError, ValueError):  # the server is gone (ValueError: a line cut short)
                return


def page_call(client, stop: threading.Event, *args, api_name: str, shown=None) -> list | None:
    """One page event, each update handed to `shown` as it comes; its last update, or None when
    the server went away first. gradio_client waits for ever on a job whose server was killed,
    so the job is polled, and left (its reader thread ended) once the server is gone and what
    it sent before had 2 s to be read."""
    job, got, gone = client.submit(*args, api_name=api_name), 0, None
    while True:
        outs = job.outputs()
        for out in outs[got:]:
            if shown is not None:
                shown(out)
        got = len(outs)
        if job.done():
            return None if job.exception() else job.result()
        if stop.is_set():
            gone = gone or time.monotonic()
            if time.monotonic() - gone > 2:
                with client.pending_lock:  # (None ends gradio_client's reader of a job)
                    for pending in client.pending_messages_per_event.values():
                        pending.append(None)
                return None
        time.sleep(0.02)


def page_client(url: str, chain: Chain, ledger: Ledger, stop: threading.Event, rnd: int) -> None:
    from gradio_client import Client

    try:
        client = Client(url + "/", verbose=False)
    except Exception:  # noqa: BLE001 (killed before the page answered)
        return
    try:
        # a new page session, as a browser's: the page loads (its conversation list: the choices
        # /open_conversation accepts), then opens the conversation
        for args, api in [((), "/page_load"), ((chain.previous,), "/open_conversation")][:1 + bool(chain.previous)]:
            if page_call(client, stop, *args, api_name=api) is None:
                if not stop.is_set():
                    ledger.error(f"page: {api} failed")
                return
        while not stop.is_set():
            seen = ledger.begin("page", rnd)

            def shown(out, seen=seen) -> None:
                chat = out[0] or []
                last = chat[-1]["content"] if chat and chat[-1]["role"] == "assistant" else []
                text = "".join(p.get("text", "") for p in last if p.get("type") == "text")
                if isinstance(out[4], str) and isinstance(out[2], dict) and out[2].get("value"):
                    # the last update: the chat drawn from the store (app/ui.py `finished`)
                    ledger.done(seen, text.split(META)[0], chain, out[2]["value"], cid=out[2]["value"])
                else:
                    ledger.show(seen, text)

            page_call(client, stop, {"text": seen.ask, "files": []}, api_name="/respond", shown=shown)
            if not seen.complete:  # the stream ended without its last update
                if not stop.is_set():
                    ledger.error(f"page: {seen.ask!r} ended without its answer")
                return
    except Exception as exc:  # noqa: BLE001 (gradio_client's many ways to say the server is gone)
        if not stop.is_set():
            ledger.error(f"page: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def cli_client(cmd: list[str], chain: Chain, ledger: Ledger, stop: threading.Event, rnd: int,
               children: list, lock: threading.Lock, err_path: Path) -> None:
    while True:
        with lock:  # (the killer holds it while it kills: no child starts after the kill)
            if stop.is_set():
                return
            seen = ledger.begin("cli", rnd)
            more = ["--conversation", chain.previous] if chain.previous else []
            with open(err_path, "a") as err:
                proc = subprocess.Popen([*cmd, "--json", *more, seen.ask], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=err, text=True, start_new_session=True)
            children.append(proc)
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:  # (a line cut by the kill)
                continue
            if ev.get("type") == "text_delta":
                ledger.show(seen, seen.text + ev["text"])
            elif ev.get("type") == "done" and ev.get("turn_id"):
                cid = ev["conversation_id"]
                ledger.done(seen, seen.text, chain, cid, cid=cid, turn_id=ev["turn_id"])
        if proc.wait() != 0 and not stop.is_set():
            ledger.error(f"cli exit {proc.returncode}: {err_path.read_text()[-300:]}")
            return


# ---- a round ----------------------------------------------------------------------------------

def start_server(cmd: list[str], url: str, log_path: Path, bound_s: float):
    """The app in a process group of its own: (process, seconds until its model is ready, or why not)."""
    import httpx

    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - t0 < bound_s:
        if proc.poll() is not None:
            return proc, f"the server exited ({proc.returncode}) before it was ready"
        try:
            if httpx.get(url + "/v1/status", timeout=5).json()["roles"]["llm"]["state"] == "ready":
                return proc, round(time.monotonic() - t0, 2)
        except Exception:  # noqa: BLE001 (not listening yet)
            pass
        time.sleep(0.1)
    return proc, f"the server was not ready within {bound_s:.0f} s"


def kill(*procs) -> None:
    """SIGKILL to each process group, all before waiting for any."""
    for proc in procs:
        with suppress(ProcessLookupError):  # (ended already)
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def wait_for_moment(mode: str, rng: random.Random, ledger: Ledger, kinds: list[str], p: dict) -> str:
    """Block until the round's kill moment; say what it was."""
    if mode in ("before_token", "random_time"):
        time.sleep(rng.uniform(0, 0.3 if mode == "before_token" else p["random_s"]))
        return mode
    with ledger.cond:
        tokens, completed = ledger.tokens, Counter(ledger.completed)
        if mode == "mid_stream":
            target = tokens + rng.randint(1, 40)
            ok = ledger.cond.wait_for(lambda: ledger.tokens >= target, p["wait_s"])
        else:
            kind = rng.choice(kinds)
            mode = f"{mode} {kind}"
            ok = ledger.cond.wait_for(lambda: ledger.completed[kind] > completed[kind], p["wait_s"])
    if mode.startswith("after"):
        time.sleep(rng.uniform(0, 0.02))
    return mode if ok else f"{mode} (not reached in {p['wait_s']} s)"


def run_round(rnd: int, mode: str, rng: random.Random, server, url: str, cli_cmd: list[str], chains: dict,
              ledger: Ledger, p: dict, logs: Path) -> dict:
    stop, lock, children = threading.Event(), threading.Lock(), []
    for chain in chains.values():
        if chain.turns >= CHAIN:  # (a new conversation now and then: the context stays small)
            chain.previous, chain.turns = "", 0
    jobs = [(api_client, url, chains[f"api{i}"], ()) for i in range(p["api"])]
    jobs += [(page_client, url, chains["page"], ())] * p["page"]
    jobs += [(cli_client, cli_cmd, chains["cli"], (children, lock, logs / "cli.log"))] * p["cli"]
    threads = [threading.Thread(target=fn, args=(to, chain, ledger, stop, rnd, *extra), daemon=True,
                                name=fn.__name__) for fn, to, chain, extra in jobs]
    for t in threads:
        t.start()
    moment = wait_for_moment(mode, rng, ledger, sorted({t.name.split("_")[0] for t in threads}), p)
    with lock:  # the kill: the server and every CLI child at once
        stop.set()
        kill(server, *children)
    for t in threads:
        t.join(JOIN_S)
    this = [s for s in ledger.turns if s.round == rnd]
    return {"moment": moment, "stuck_clients": [t.name for t in threads if t.is_alive()],
            "completed": sum(s.complete for s in this),
            "cut_mid_stream": sum(bool(s.text) and not s.complete for s in this),
            "cut_before_a_token": sum(not s.text and not s.complete for s in this)}


# ---- the check --------------------------------------------------------------------------------

def check(data_dir: Path, ledger: Ledger) -> dict:
    """The data dir as the kill left it: integrity, every completed turn there, every answer whole."""
    from engine.store import Store

    problems, lost, half = [], set(), set()
    with closing(sqlite3.connect(data_dir / "conversations.sqlite3")) as db:
        integrity = [r[0] for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        integrity += [f"foreign key {tuple(r)}" for r in db.execute("PRAGMA foreign_key_check")]
        db.row_factory = sqlite3.Row
        turns = {r["id"]: r for r in db.execute("SELECT * FROM turns")}
        responses = {r["id"]: r for r in db.execute("SELECT * FROM responses")}
        heads = db.execute("SELECT id, head_id FROM conversations").fetchall()
    integrity += [f"conversation {c} shows turn {h}, not one of its own" for c, h in heads
                  if h is not None and (h not in turns or turns[h]["conversation_id"] != c)]
    asks = {s.ask: s for s in ledger.turns}

    def flag(bad: set, key, why: str) -> None:
        bad.add(key)
        problems.append(f"{key}: {why}")

    def as_seen(key, stored: str, seen: Seen | None) -> None:
        if seen is not None and not (stored == seen.text if seen.complete else stored.startswith(seen.text)):
            flag(half, key, f"stored {stored[:60]!r}, its client saw {seen.text[:60]!r}")

    answers: dict[int, list[int]] = {}
    for t in turns.values():
        key, meta, parent = ("turn", t["id"]), json.loads(t["meta"]), turns.get(t["parent_id"])
        if t["role"] == "user":
            if t["content"] not in asks:
                flag(half, key, f"a user turn no client sent: {t['content'][:60]!r}")
            continue
        ending = (meta.get("usage") or {}).get("finish_reason")
        if not {"complete": ending in ("stop", "length") or "tool" in meta, "interrupted": ending == "cancelled",
                "error": bool(meta.get("error"))}.get(t["status"], False):
            flag(half, key, f"status {t['status']!r}, ended by {ending!r}")
        if parent is None or parent["role"] != "user" or parent["conversation_id"] != t["conversation_id"]:
            flag(half, key, "an answer that follows no user turn of its conversation")
            continue
        answers.setdefault(parent["id"], []).append(t["id"])
        as_seen(key, t["content"], asks.get(parent["content"]))
    for user, ids in answers.items():
        if len(ids) > 1:
            flag(half, ("turn", ids[-1]), f"user turn {user} has {len(ids)} answers")
    for rid, r in responses.items():
        key, body, said = ("response", rid), json.loads(r["body"]), json.loads(r["messages"])
        if body.get("status") not in ("completed", "incomplete") or body.get("id") != rid:
            flag(half, key, f"status {body.get('status')!r}")
        if said[-1:] != [{"role": "assistant", "content": output_text(body) or None}]:
            flag(half, key, "its output and its stored message differ")
        if r["previous_id"] and r["previous_id"] not in responses:
            flag(half, key, f"follows {r['previous_id']}, which is not stored")
        seen = asks.get(said[0].get("content")) if said else None
        if seen is None:
            flag(half, key, "a response no client asked for")
        as_seen(key, output_text(body), seen)
    store = Store(data_dir)
    try:
        for s in (s for s in ledger.turns if s.complete):
            if s.kind == "api":
                said = store.response_messages(s.rid) or [{}]
                ok = said[-1] == {"role": "assistant", "content": s.text or None} and \
                    {"role": "user", "content": s.ask} in said
            elif s.kind == "cli":
                got = store.turn(s.cid, s.turn_id)
                ok = got is not None and got.content == s.text and got.parent_id in turns and \
                    turns[got.parent_id]["content"] == s.ask
            else:
                tree = store.tree(s.cid)
                asked = [t.id for t in tree if t.role == "user" and t.content == s.ask]
                ok = len(asked) == 1 and [t.content for t in tree if t.parent_id == asked[0]] == [s.text]
            if not ok:
                flag(lost, (s.kind, s.ask), "its client saw it complete; it is not stored as it saw it")
    finally:
        store.close()
    answered = {t["parent_id"] for t in turns.values() if t["role"] == "assistant"}
    return {"integrity": integrity, "lost": lost, "half": half, "problems": problems,
            "statuses": Counter(t["status"] for t in turns.values() if t["role"] == "assistant"),
            "unanswered_user_turns": sum(t["role"] == "user" and t["id"] not in answered for t in turns.values())}


def read_back(url: str, ledger: Ledger, done: set) -> list[str]:
    """Each completed response not read back yet, through GET /v1/responses/{id}: those missing."""
    import httpx

    missing = []
    for s in ledger.turns:
        if s.kind == "api" and s.complete and s.rid not in done:
            r = httpx.get(f"{url}/v1/responses/{s.rid}", timeout=30)
            if r.status_code != 200 or output_text(r.json()) != s.text:
                missing.append(s.ask)
            done.add(s.rid)
    return missing


# ---- the run ----------------------------------------------------------------------------------

def run_kill(kills: int, profile: str, data_dir: Path, seed: int, log=print, flags=(), ledger: Ledger | None = None,
             **settings) -> dict:
    """`kills` rounds of start / stream / SIGKILL / check on one new data dir, then a last start.
    `flags`: more run_app.py flags for the server and the CLI (a test's model folder);
    `settings`: PROFILES fields to change (clients of each kind, bounds)."""
    p = {**PROFILES[profile], **settings}
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / "conversations.sqlite3").exists():  # (its turns would be no client's: flagged)
        raise ValueError(f"{data_dir} holds a database already: the run needs a data dir of its own")
    if profile == "cpu" and not (data_dir / "models").exists() and (SERVING_DATA / "models").is_dir():
        subprocess.run(["cp", "-al", str(SERVING_DATA / "models"), str(data_dir / "models")], check=True)
    logs = data_dir.parent / f"{data_dir.name}-logs"  # the server's output, the CLI's errors
    logs.mkdir(exist_ok=True)
    app = [sys.executable, "run_app.py"]
    common = ["--profile", profile, "--data-dir", str(data_dir), *flags, "--max-new-tokens", str(p["tokens"])]
    rng = random.Random(seed)
    order = [m for _ in range(kills // len(MODES) + 1) for m in rng.sample(MODES, len(MODES))][:kills]
    ledger = ledger or Ledger()
    chains = {name: Chain() for name in [*(f"api{i}" for i in range(p["api"])), "page", "cli"]}
    starts, rounds, read, missing, problems = [], [], set(), set(), {}
    lost, half, integrity, start_failure, last = set(), set(), 0, None, {}
    t_all = time.monotonic()
    for rnd in range(kills + 1):  # (the last start shows the server starts again after the last kill)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server, ready = start_server([*app, *common, "--port", str(port)], url, logs / "server.log", p["start_s"])
        if isinstance(ready, str):
            kill(server)
            start_failure = f"start {rnd + 1}: {ready}; its log ends: {(logs / 'server.log').read_text()[-1500:]}"
            log(start_failure)
            break
        starts.append(ready)
        try:
            missing.update(read_back(url, ledger, read))
            if rnd == kills:
                break
            t0 = time.monotonic()
            row = run_round(rnd, order[rnd], rng, server, url, [*app, "chat", *common], chains, ledger, p, logs)
        finally:
            kill(server)
        last = check(data_dir, ledger)
        lost, half, integrity = lost | last["lost"], half | last["half"], integrity + bool(last["integrity"])
        for x in last["integrity"] + last["problems"]:
            problems.setdefault(x, f"after kill {rnd + 1}: {x}")
        rounds.append({**row, "seconds": round(time.monotonic() - t0, 1)})
        log(f"kill {rnd + 1}/{kills} ({row['moment']}) after a start of {ready} s: completed {row['completed']}, "
            f"cut mid-stream {row['cut_mid_stream']}, before a token {row['cut_before_a_token']}; so far lost "
            f"{len(lost)}, half-written {len(half)}, integrity failures {integrity}"
            + (f"; clients still running: {row['stuck_clients']}" if row["stuck_clients"] else ""))
    seen = Counter(s.kind for s in ledger.turns if s.complete)
    restarts, secs = starts[1:], [r["seconds"] for r in rounds]
    return {
        "bench": "kill", "profile": profile, "seed": seed, "kills": len(rounds),
        "clients": {k: p[k] for k in ("api", "page", "cli")}, "max_new_tokens": p["tokens"],
        "rounds_started_again": len(restarts), "start_failure": start_failure,
        "completed_turns_seen": {**{k: seen[k] for k in ("api", "page", "cli")}, "total": sum(seen.values())},
        "lost": len(lost | {("api", a) for a in missing}), "half_written_visible": len(half),
        "integrity_failures": integrity, "responses_missing_on_read_back": len(missing),
        "stored_answer_statuses": dict(last.get("statuses", {})),
        "unanswered_user_turns": last.get("unanswered_user_turns", 0),
        "turns_cut_mid_stream": sum(r["cut_mid_stream"] for r in rounds),
        "turns_cut_before_a_token": sum(r["cut_before_a_token"] for r in rounds),
        "kill_moments": dict(Counter(r["moment"] for r in rounds)),
        "restart_s": {"p50": round(statistics.median(restarts), 2) if restarts else None,
                      "max": max(restarts, default=None)},
        "first_start_s": starts[0] if starts else None,
        "round_s": {"p50": round(statistics.median(secs), 1) if secs else None, "max": max(secs, default=None)},
        "total_s": round(time.monotonic() - t_all, 1),
        "stuck_clients": sum(len(r["stuck_clients"]) for r in rounds), "client_errors": ledger.errors[:10],
        "problems": list(problems.values())[:20], "logs": str(logs),
        "server_log_tracebacks": (logs / "server.log").read_text(errors="replace").count("Traceback"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, help="a new folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kill.json")
    args = ap.parse_args()
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="kill-")) / "data"
    result = run_kill(args.kills, args.profile, data, args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["command"] = " ".join(["python", "bench/kill.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    ok = result["lost"] == result["half_written_visible"] == result["integrity_failures"] == 0
    return 0 if ok and result["rounds_started_again"] == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
