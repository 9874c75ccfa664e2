#!/usr/bin/env python3
"""Soak (issue 25, item 3): N clients for minutes through the scheduler, then memory back where it was.

Starts the real server as a child (`run_app.py --profile P`), warms it up with one request of each
kind, takes the server's RSS (children included), then runs N clients for the given time: N-1 loop
over a seeded mix of streamed chat, tool calls (arguments checked against the tool's schema),
transcriptions of a WAV the server itself spoke (/v1/audio/speech) and streamed Responses turns
(continued by previous_response_id now and then); one is a realtime voice session (/v1/realtime,
server VAD: speech in, a transcript, a spoken and written answer, again; a fresh connection every
few turns). A 429 (the queue is full) is documented: the client backs off, retries, and it is
counted apart; anything else that is not a complete answer is an error (first messages kept). RSS
is sampled every second (peak); the end RSS is read after the server idles a few seconds. Prints
one JSON object as its last line and writes it.

    python bench/soak.py [--clients 20] [--seconds 600] [--profile cpu] [--out bench/results/soak.json]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _folder in ("bench", "tests"):  # (appended: imported by a test, nothing of the session is shadowed)
    if str(ROOT / _folder) not in sys.path:
        sys.path.append(str(ROOT / _folder))

_path = list(sys.path)
from serving import DATA, QUESTIONS, free_port, pct, stop, wait_ready  # noqa: E402 - bench/serving.py's helpers

sys.path[:] = _path  # (serving.py puts bench/ first on import: bench/api.py, tools.py... would shadow)

KINDS = ("chat", "tools", "transcription", "responses", "voice")
MIX = {"chat": 0.35, "tools": 0.25, "transcription": 0.15, "responses": 0.25}  # the HTTP clients' draw
SPOKEN = "What is the capital of France?"
HEARD = "france"  # what a transcript of SPOKEN must contain
SYSTEM = "You are a helpful assistant. Answer briefly."
TOOL_ASKS = ["What's the weather in Paris right now?", "Add 17 and 25 for me.", "Is it raining in Oslo?",
             "What is 3 plus 4? Use the tool.", "Tell me the weather in Tokyo in fahrenheit."]
# the tiny profile has no speech roles of its own: the soak turns on the packaged ones (as tests do)
SPEECH_FLAGS = ["--asr-backend", "faster-whisper", "--tts-backend", "piper", "--set", "vad.backend=silero"]
TIMEOUT_S = 300  # one request, queue wait included
VOICE_TURN_S = 240  # one spoken turn: the answer's audio is paced at playback speed
TURNS_PER_VOICE_SESSION = 4


class NotComplete(Exception):
    """A request's outcome other than complete: `busy` (a 429) or an error with its message."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class Tally:
    """Per kind: requests, complete, 429s, errors (first messages), latencies of complete ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows = {k: {"requests": 0, "complete": 0, "busy_429": 0, "errors": 0, "error_samples": [],
                         "ms": []} for k in KINDS}

    def add(self, kind: str, ms: float, error: str | None = None, busy: bool = False) -> None:
        with self.lock:
            row = self.rows[kind]
            row["requests"] += 1
            if busy:
                row["busy_429"] += 1
            elif error is not None:
                row["errors"] += 1
                if len(row["error_samples"]) < 5:
                    row["error_samples"].append(error[:300])
            else:
                row["complete"] += 1
                row["ms"].append(ms)

    def report(self) -> dict:
        def s(ms: float | None) -> float | None:
            return None if ms is None else round(ms / 1000, 2)

        return {kind: {**{k: v for k, v in row.items() if k != "ms"},
                       "latency_s": {"p50": s(pct(row["ms"], 0.5)), "p90": s(pct(row["ms"], 0.9))}}
                for kind, row in self.rows.items()}


def _http(url: str):
    import httpx

    return httpx.Client(base_url=url, timeout=httpx.Timeout(TIMEOUT_S, connect=30))


def _status(r, what: str) -> None:
    if r.status_code == 429:
        raise NotComplete("429", busy=True)
    if r.status_code != 200:
        raise NotComplete(f"{what}: HTTP {r.status_code} {r.read()[:200]!r}")


def _sse(r):
    """The JSON documents of an SSE stream (and the string "[DONE]")."""
    for line in r.iter_lines():
        if line.startswith("data: "):
            yield "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])


# ---- one request of each kind: returns None when complete, raises NotComplete otherwise ----------------------

def chat(http, rng: random.Random, n: int, state: dict) -> None:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": rng.choice(QUESTIONS)}],
            "max_tokens": 48, "stream": True, "seed": n}
    text, finish, ended = "", None, False
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        _status(r, "chat")
        for doc in _sse(r):
            if doc == "[DONE]":
                ended = True
            elif "error" in doc:
                raise NotComplete(f"chat: an error in the stream: {doc['error'].get('message')}")
            else:
                for choice in doc.get("choices", ()):
                    text += choice["delta"].get("content") or ""
                    finish = choice.get("finish_reason") or finish
    if not (ended and finish and text.strip()):
        raise NotComplete(f"chat: incomplete (finish {finish!r}, [DONE] {ended}, {len(text)} characters)")


def tools(http, rng: random.Random, n: int, state: dict) -> None:
    import jsonschema
    from test_api_tools import ADD, WEATHER  # the tools tests/test_api_tools.py calls

    choice = rng.choice(["auto", "auto", "required"])
    body = {"messages": [{"role": "user", "content": rng.choice(TOOL_ASKS)}], "tools": [WEATHER, ADD],
            "tool_choice": choice, "max_tokens": 120, "seed": n}
    r = http.post("/v1/chat/completions", json=body)
    _status(r, "tools")
    answer = r.json()["choices"][0]
    message, finish = answer["message"], answer.get("finish_reason")
    if message.get("tool_calls"):
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
        for call in message["tool_calls"]:
            try:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
            except (ValueError, KeyError, jsonschema.ValidationError) as exc:
                raise NotComplete(f"tools: an invalid call {call['function']}: {str(exc)[:120]}") from None
        if finish != "tool_calls":
            raise NotComplete(f"tools: calls with finish_reason {finish!r}")
    elif choice == "required" or not (message.get("content") or "").strip() or finish not in ("stop", "length"):
        raise NotComplete(f"tools: no call and no answer (tool_choice {choice}, finish {finish!r})")


def transcription(http, rng: random.Random, n: int, state: dict) -> None:
    r = http.post("/v1/audio/transcriptions", files={"file": ("question.wav", state["wav"], "audio/wav")},
                  data={"model": "whisper-1"})
    _status(r, "transcription")
    text = r.json().get("text", "")
    if HEARD not in text.lower():
        raise NotComplete(f"transcription: heard {text[:80]!r}")


def responses(http, rng: random.Random, n: int, state: dict) -> None:
    """A streamed turn; every third starts afresh, the others continue the client's last response."""
    body = {"input": rng.choice(QUESTIONS), "instructions": SYSTEM, "max_output_tokens": 48, "stream": True}
    if state.get("previous") and n % 3:
        body["previous_response_id"] = state["previous"]
    text, end = "", None
    with http.stream("POST", "/v1/responses", json=body) as r:
        _status(r, "responses")
        for doc in _sse(r):
            kind = doc.get("type", "") if isinstance(doc, dict) else ""
            if kind == "response.output_text.delta":
                text += doc["delta"]
            elif kind in ("response.completed", "response.incomplete", "response.failed", "error"):
                end = doc
    if end is None or end["type"] not in ("response.completed", "response.incomplete"):
        raise NotComplete(f"responses: ended with {json.dumps(end)[:200] if end else 'nothing'}")
    done = end["response"]
    said = "".join(c.get("text", "") for item in done["output"] if item["type"] == "message" for c in item["content"])
    cut = done["status"] == "incomplete" and (done.get("incomplete_details") or {}).get("reason") == "max_output_tokens"
    if not text.strip() or said != text or not (done["status"] == "completed" or cut):
        raise NotComplete(f"responses: {done['status']}, {len(text)} characters streamed, {len(said)} in the response")
    state["previous"] = done["id"]


REQUESTS = {"chat": chat, "tools": tools, "transcription": transcription, "responses": responses}


# ---- the voice session ------------------------------------------------------------------------------

def _until(ws, kinds: tuple, seen: list, limit: float) -> dict:
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            last = [e["type"] for e in seen][-6:]
            raise NotComplete(f"voice: no {' or '.join(kinds)} within {limit:.0f} s (last: {last})")
        event = json.loads(ws.recv(timeout=left))
        seen.append(event)
        if event["type"] == "error":
            raise NotComplete(f"voice: error event {event['error'].get('message')}")
        if event["type"] in kinds:
            return event


def voice_turn(ws, pcm: bytes) -> None:
    """The spoken question (and a second of silence: the end of the turn), in 0.4 s frames as a
    client streams a recording; then everything up to response.done."""
    seen: list = []
    step = 24000 * 2 * 2 // 5
    for i in range(0, len(pcm), step):
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()}))
    heard = _until(ws, ("conversation.item.input_audio_transcription.completed",), seen, VOICE_TURN_S)
    done = _until(ws, ("response.done",), seen, VOICE_TURN_S)
    audio = sum(len(base64.b64decode(e["delta"])) for e in seen if e["type"] == "response.audio.delta")
    said = "".join(e["delta"] for e in seen if e["type"] == "response.audio_transcript.delta")
    if HEARD not in heard["transcript"].lower():
        raise NotComplete(f"voice: heard {heard['transcript'][:80]!r}")
    if done["response"]["status"] != "completed" or not audio or not said.strip():
        raise NotComplete(f"voice: response {done['response']['status']}, {audio} audio bytes, {len(said)} characters")


@contextmanager
def voice_connection(url: str):
    """A realtime connection, its session told to answer briefly."""
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws", 1) + "/v1/realtime", max_size=None, open_timeout=60) as ws:
        seen: list = []
        _until(ws, ("session.created",), seen, 60)
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Answer in one short sentence."}}))
        _until(ws, ("session.updated",), seen, 60)
        yield ws


def voice_client(url: str, pcm: bytes, stop: float, tally: Tally) -> None:
    """One voice session at a time, for the whole soak: a new connection every few turns, and after
    a turn that did not complete (the connection's state is then unknown)."""
    while time.monotonic() < stop:
        try:
            with voice_connection(url) as ws:
                for _ in range(TURNS_PER_VOICE_SESSION):
                    if time.monotonic() >= stop:
                        break
                    t0 = time.monotonic()
                    voice_turn(ws, pcm)
                    tally.add("voice", 1000 * (time.monotonic() - t0))
        except Exception as exc:  # noqa: BLE001 - counted: an incomplete turn, a socket that broke
            tally.add("voice", 0, str(exc) if isinstance(exc, NotComplete) else f"voice: {type(exc).__name__}: {exc}")
            time.sleep(1)


def http_client(url: str, i: int, seed: int, stop: float, tally: Tally, state: dict) -> None:
    """One HTTP client: a seeded draw of the kinds, back to back; after a 429 it backs off and retries."""
    rng = random.Random(seed * 1000 + i)
    kinds, weights = list(MIX), list(MIX.values())
    state = dict(state)
    with _http(url) as http:
        n = 0
        while time.monotonic() < stop:
            kind, n = rng.choices(kinds, weights)[0], n + 1
            while True:
                t0 = time.monotonic()
                try:
                    REQUESTS[kind](http, rng, seed * 100_000 + i * 1000 + n, state)
                    tally.add(kind, 1000 * (time.monotonic() - t0))
                except NotComplete as exc:
                    tally.add(kind, 0, None if exc.busy else str(exc), busy=exc.busy)
                    if exc.busy and time.monotonic() < stop:
                        time.sleep(rng.uniform(0.5, 2.0))
                        continue
                except Exception as exc:  # noqa: BLE001 - counted: a broken connection, a malformed answer
                    tally.add(kind, 0, f"{kind}: {type(exc).__name__}: {exc}")
                break


# ---- the run -------------------------------------------------------------------------------------

class Sampler:
    """Once a second: the server's RSS with its children's (read as tests/memprobe.Peak reads it;
    its own 5 ms sampler is not wanted here) and the machine's load (it is shared)."""

    def __init__(self, pid: int) -> None:
        from memprobe import Peak

        probe = Peak(pid)
        probe.stop()
        self.rss = probe.rss
        self.start = self.peak = self.rss()
        self.every_30_s: list[int] = []
        self.loads: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                now = self.rss()
            except Exception:  # noqa: BLE001 - the server has gone: the report says so
                return
            self.peak = max(self.peak, now)
            self.loads.append(os.getloadavg()[0])
            if len(self.loads) % 30 == 0:
                self.every_30_s.append(round(now / 1e6))

    def stop(self) -> None:
        self._stop.set()


@contextmanager
def child_server(profile: str, data_dir: Path, server_args, say):
    """run_app.py as a child on a free port (its output in data_dir/server.log), ready to answer;
    stopped on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "run_app.py", "--profile", profile, "--data-dir", str(data_dir), "--port", str(port),
           *(SPEECH_FLAGS if profile == "tiny" else []), *server_args]
    say(f"starting {' '.join(cmd[1:])}")
    with open(data_dir / "server.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_ready(url, proc, ours=True)
        say("the model is ready")
        yield proc, url
    finally:
        stop(proc)


def warm_up(url: str, state: dict) -> dict:
    """The spoken question made by the server (a WAV, and 24 kHz PCM for the voice), then one request
    of each kind, all at once, before the starting RSS: the models loaded, every path run once.
    Returns each one's seconds; raises what a failed one raised."""
    with _http(url) as http:
        for fmt in ("wav", "pcm"):  # (pcm: 24 kHz s16le, as the realtime socket takes it)
            r = http.post("/v1/audio/speech", json={"input": SPOKEN, "response_format": fmt})
            r.raise_for_status()
            state[fmt] = r.content
    state["pcm"] += bytes(24000 * 2)  # and a second of silence: the turn's end
    took, failed = {}, []

    def one(kind: str) -> None:
        t0 = time.monotonic()
        try:
            if kind == "voice":
                with voice_connection(url) as ws:
                    voice_turn(ws, state["pcm"])
            else:
                with _http(url) as http:
                    REQUESTS[kind](http, random.Random(0), 0, dict(state))
        except Exception as exc:  # noqa: BLE001 - raised below, in this thread
            failed.append(exc)
        took[kind] = round(time.monotonic() - t0, 2)

    threads = [threading.Thread(target=one, args=(kind,)) for kind in KINDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + VOICE_TURN_S)
    if failed or len(took) < len(KINDS):
        raise RuntimeError(f"the warm-up failed: {failed or 'a request did not end'}") from (failed or [None])[0]
    return took


def run_soak(clients: int, seconds: float, profile: str, data_dir: Path, seed: int, log=print,
             server_args: list[str] = (), idle_s: float = 5.0) -> dict:
    """Start the server, warm it up, run `clients` clients (one of them the voice session) for `seconds`,
    and report each kind's outcomes and the server's RSS. `server_args`: more run_app.py flags."""
    import httpx

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if profile == "cpu" and not (data_dir / "models").exists() and (DATA / "models").is_dir():
        # the converted model of bench/serving.py's cache, hard-linked: no cold start (~90 s)
        subprocess.run(["cp", "-al", str(DATA / "models"), str(data_dir / "models")], check=True)
    began = time.monotonic()
    say = lambda text: log(f"soak [{time.monotonic() - began:5.0f} s]: {text}")  # noqa: E731
    with child_server(profile, data_dir, server_args, say) as (proc, url):
        state: dict = {}
        warm = warm_up(url, state)
        say(f"warmed up (seconds per kind: {warm})")
        time.sleep(idle_s)
        memory = Sampler(proc.pid)
        tally, t0 = Tally(), time.monotonic()
        stop = t0 + seconds
        say(f"{clients} clients for {seconds:.0f} s, start RSS {memory.start / 1e6:.0f} MB")
        threads = [threading.Thread(target=voice_client, args=(url, state["pcm"], stop, tally))]
        threads += [threading.Thread(target=http_client, args=(url, i, seed, stop, tally, state))
                    for i in range(1, clients)]
        for t in threads:
            t.start()
        for t in threads:  # each client ends within one request's timeout of `stop`
            t.join(max(0.0, stop - time.monotonic()) + TIMEOUT_S + VOICE_TURN_S + 60)
        wall = time.monotonic() - t0
        say(f"the clients are done ({wall:.0f} s)")
        time.sleep(idle_s)  # let the server go idle
        memory.stop()
        try:
            end = memory.rss()
            serving = httpx.get(url + "/v1/status", timeout=30).json()["model"].get("serving")
        except Exception:  # noqa: BLE001 - gone or not answering: reported as not alive
            end, serving = 0, None
        alive = proc.poll() is None and serving is not None
    kinds = tally.report()
    result = {
        "bench": "soak", "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    # (a shared machine: what else ran shows here)
                    "load_average_1min_mean": round(sum(memory.loads) / max(1, len(memory.loads)), 1)},
        "profile": profile, "clients": clients, "voice_sessions": 1, "seconds": seconds, "seed": seed,
        "wall_s": round(wall, 1), "warm_up_s": warm, "kinds": kinds,
        "totals": {k: sum(row[k] for row in kinds.values()) for k in ("requests", "complete", "busy_429", "errors")},
        "rss_mb": {"start": round(memory.start / 1e6, 1), "peak": round(memory.peak / 1e6, 1),
                   "end": round(end / 1e6, 1), "end_over_start": round(end / memory.start, 3),
                   "every_30_s": memory.every_30_s},
        "clients_still_running": sum(t.is_alive() for t in threads), "server_alive": alive, "serving": serving,
        "server_log_tracebacks": (data_dir / "server.log").read_text(errors="replace").count("Traceback (most recent"),
    }
    say(f"{result['totals']}, RSS {result['rss_mb']}")
    return result


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    ap.add_argument("--data-dir", help="the server's data dir, kept (server.log) (default: a temporary one)")
    ap.add_argument("--server-arg", action="append", default=[], help="one more run_app.py argument (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = run_soak(args.clients, args.seconds, args.profile, Path(args.data_dir or Path(tmp) / "data"),
                          args.seed, log=lambda s: print(s, file=sys.stderr, flush=True), server_args=args.server_arg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
