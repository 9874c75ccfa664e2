#!/usr/bin/env python3
"""How fast an answer reaches the user in the browser, beside the same answer through the API.

Starts `run_app.py --profile cpu` on 127.0.0.1 and sends the same prompts (a) through the
page in headless chromium (playwright: typed into `#input textarea`, the answer watched with a
MutationObserver, the token count read from the footer "N tokens · X tok/s · first token Y ms")
and (b) through POST /v1/chat/completions streamed. For each it reports the tokens per second
the client saw, from its first text to the end of the answer (the footer shown / the last
chunk), the time to the first text, how many times the page redrew the answer, and the ratio
browser/API (of the medians, and the median of each prompt's pair, sent back to back). Waits
(bounded) for the 1-minute load average to drop under 1.0 and records it, and the load at
each prompt and the CPU seconds other processes used meanwhile (another bench on the machine
shows there, and as a slow pair).
Prints one JSON object as its last line and writes bench/results/ui.json.

    python bench/ui.py [--data-dir /tmp/benchdata] [--tokens 200] [--screenshot /tmp/ui.png]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain how a bicycle works, with a markdown list of its main parts.",
    "Write a short guide to brewing good coffee at home, in numbered steps.",
    "Describe the water cycle step by step, with a heading and a bulleted list.",
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
# every change of the last answer's text, and when the footer said "tokens": performance.now() ms
WATCH = """() => {
  const w = window.__bench = {changes: [], footer: null, start: null};
  const chat = document.querySelector('#chat'), foot = document.querySelector('#turn-info');
  let last = 0;
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.bot');
    const n = bots.length ? bots[bots.length - 1].textContent.trim().length : 0;
    if (n !== last) { last = n; w.changes.push([performance.now(), n]); }
  }).observe(chat, {subtree: true, childList: true, characterData: true});
  new MutationObserver(() => {
    if (w.footer === null && /tokens/.test(foot.textContent)) w.footer = performance.now();
  }).observe(foot, {subtree: true, childList: true, characterData: true});
}"""


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(limit_s: float, threshold: float = 1.0) -> dict:
    first, start = load1(), time.monotonic()
    while load1() >= threshold and time.monotonic() - start < limit_s:
        time.sleep(10)
    return {"load_1min_at_start": first, "load_1min_when_timing": load1(),
            "waited_s": round(time.monotonic() - start, 1), "quiet": load1() < threshold}


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {"cpu": model.group(1) if model else platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def cpu_seconds_elsewhere() -> dict[int, float]:
    """CPU seconds so far of every process outside this bench (the app and chromium are its children)."""
    import psutil

    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    seconds = {}
    for proc in psutil.process_iter():
        try:
            if proc.pid not in mine:
                seconds[proc.pid] = sum(proc.cpu_times()[:2])
        except psutil.Error:
            pass
    return seconds


def measured(run, *args) -> dict:
    """run(*args)'s figures, with the load and the CPU seconds other processes took meanwhile."""
    before = cpu_seconds_elsewhere()
    figures = run(*args)
    after = cpu_seconds_elsewhere()
    others = sum(max(0.0, s - before.get(pid, 0.0)) for pid, s in after.items())
    return {**figures, "load_1min": load1(), "others_cpu_s": round(others, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app(data_dir: str, tokens: int):
    """The app on a loopback port, cpu profile; yields its URL once the page is served."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "run_app.py", "--profile", "cpu", "--data-dir", data_dir,
                             "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", str(tokens)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    try:
        while True:
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start (exit {proc.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def through_api(url: str, prompt: str, tokens: int) -> dict:
    import httpx

    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": tokens}
    sent, first, end, usage, chunks = time.perf_counter(), None, None, {}, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            usage = obj.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in obj.get("choices", [])):
                chunks += 1
                first = first or time.perf_counter()
            end = time.perf_counter()
    n = usage.get("completion_tokens", 0)
    return {"tokens": n, "tok_s": rate(n, first, end), "first_text_ms": ms(sent, first), "updates": chunks}


def through_page(browser, url: str, prompt: str, screenshot: str | None) -> dict:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(url + "/", wait_until="load")
        box = page.locator("#input textarea")
        box.wait_for(timeout=60_000)
        box.fill(prompt)
        page.evaluate(WATCH)
        page.evaluate("() => { window.__bench.start = performance.now(); }")
        box.press("Enter")
        page.wait_for_function("() => window.__bench.footer !== null", timeout=300_000)
        w = page.evaluate("() => window.__bench")
        footer = page.locator("#turn-info").inner_text()
        if screenshot:
            page.screenshot(path=screenshot, full_page=True)
    finally:
        page.close()
    found = re.search(r"(\d+) tokens(?: · ([\d.]+) tok/s)?", footer)
    n = int(found.group(1)) if found else 0
    grown = [t for t, length in w["changes"] if length > 0]
    first = grown[0] / 1000 if grown else None
    return {"tokens": n, "tok_s": rate(n, first, w["footer"] / 1000), "first_text_ms": ms(w["start"] / 1000, first),
            "updates": len(grown), "footer": footer.strip(),
            "footer_tok_s": float(found.group(2)) if found and found.group(2) else None}


def rate(tokens: int, first: float | None, end: float | None) -> float | None:
    """Tokens per second after the first text: the first token is the wait, not the stream."""
    if first is None or end is None or end <= first or tokens < 2:
        return None
    return round((tokens - 1) / (end - first), 1)


def ms(start: float, then: float | None) -> float | None:
    return None if then is None else round((then - start) * 1000, 1)


def summary(runs: list[dict]) -> dict:
    med = lambda key: round(statistics.median(r[key] for r in runs if r[key] is not None), 1)  # noqa: E731
    return {"tok_s": med("tok_s"), "first_text_ms": med("first_text_ms"), "tokens": med("tokens"),
            "updates": med("updates"), "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="/tmp/benchdata", help="a warm cpu-profile data dir")
    ap.add_argument("--tokens", type=int, default=200, help="max new tokens of every answer")
    ap.add_argument("--wait", type=float, default=600, help="seconds to wait for load < 1.0")
    ap.add_argument("--screenshot", default="", help="save the page after the first answer here (png)")
    ap.add_argument("--label", default="", help="a note stored with the figures (e.g. the commit)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ui.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the app and the browser are closed on the way out
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    load = wait_for_quiet(args.wait)
    page_runs, api_runs = [], []
    with app(args.data_dir, args.tokens) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            through_api(url, "Hello", 8)  # warm: the first turn after a start pays one-off costs
            for i, prompt in enumerate(PROMPTS):
                page_runs.append(measured(through_page, browser, url, prompt, args.screenshot if i == 0 else None))
                api_runs.append(measured(through_api, url, prompt, args.tokens))
        finally:
            browser.close()
    browser_fig, api_fig = summary(page_runs), summary(api_runs)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "label": args.label, "machine": machine(),
              "load": {**load, "load_1min_after": load1()}, "profile": "cpu", "max_new_tokens": args.tokens,
              "prompts": PROMPTS, "browser": browser_fig, "api": api_fig,
              "browser_over_api": round(browser_fig["tok_s"] / api_fig["tok_s"], 2),
              "browser_over_api_per_prompt": statistics.median(
                  round(b["tok_s"] / a["tok_s"], 2) for b, a in zip(page_runs, api_runs) if b["tok_s"] and a["tok_s"])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("browser", "api", "prompts", "machine")}
                     | {"browser_tok_s": browser_fig["tok_s"], "api_tok_s": api_fig["tok_s"]}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
