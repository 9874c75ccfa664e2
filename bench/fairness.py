#!/usr/bin/env python3
"""Fairness under load: the model queue (engine/queueing.FairLock) vs the lock it replaced.

20 clients each send answers back to back through `Engine.answer` (the tiny
profile's model, so the model itself costs little and the lock is what is
measured) for the same wall time with each kind of lock, in one run:
- `fifo`: FairLock, served in arrival order (ours);
- `polled`: a threading.Lock polled with `acquire(timeout=0.05)`, as before.
Reports per kind the wait for the model (p50 / p90 / max), how many answers
each client got (min / max), and the ratios. Prints one JSON object as its
last line and writes bench/results/fairness.json.

    python bench/fairness.py [--clients 20] [--seconds 20] [--tokens 24]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


class PolledLock:
    """The old model lock: whoever polls first after a release wins; no order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, cancelled=None, refuse_when_full=False) -> bool:
        while not self._lock.acquire(timeout=0.05):
            if cancelled is not None and cancelled():
                return False
        return True

    def release(self) -> None:
        self._lock.release()

    busy = property(lambda self: self._lock.locked())
    waiting = 0

    def full(self) -> bool:
        return False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def load(engine, clients: int, seconds: float, tokens: int) -> dict:
    from engine.events import CancelToken

    params = engine.params(tokens, 0.0)
    waits: list[float] = []
    counts = [0] * clients
    stop = time.monotonic() + seconds
    guard = threading.Lock()

    def client(i: int) -> None:
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"Client {i}: tell me about the sea."}]
        while time.monotonic() < stop:
            gen = engine.answer(messages, params, CancelToken())
            try:
                while True:
                    next(gen)
            except StopIteration as done:
                _, usage, timings = done.value
            with guard:
                counts[i] += 1
                waits.append(timings.get("queue_ms", 0.0) / 1000)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    waits.sort()
    q = statistics.quantiles(waits, n=10) if len(waits) > 1 else [waits[0]] * 9
    return {"answers": len(waits), "wait_p50_s": round(q[4], 3), "wait_p90_s": round(q[8], 3),
            "wait_max_s": round(waits[-1], 3), "answers_per_client_min": min(counts),
            "answers_per_client_max": max(counts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()

    from engine.config import load_config
    from engine.engine import Engine
    from engine.queueing import FairLock

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(load_config("tiny", overrides={"data_dir": tmp, "max_queue": "0",
                                                       "context_tokens": "512"}, env={}))
        engine.start_loading().join()
        load(engine, 2, 1.0, args.tokens)  # warm up
        results = {}
        for name, lock in (("fifo", FairLock(0)), ("polled", PolledLock())):
            engine.model_lock = lock
            results[name] = load(engine, args.clients, args.seconds, args.tokens)
        engine.close()
    fifo, polled = results["fifo"], results["polled"]
    out = {
        "bench": "fairness", "clients": args.clients, "seconds_each": args.seconds, "tokens": args.tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d"), **results,
        "max_wait_ratio_polled_over_fifo": round(polled["wait_max_s"] / max(fifo["wait_max_s"], 1e-6), 2),
        "p90_wait_ratio_polled_over_fifo": round(polled["wait_p90_s"] / max(fifo["wait_p90_s"], 1e-6), 2),
    }
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "fairness.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
