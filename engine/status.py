"""What the status panel and /v1/status show: profile, each role, memory."""
from __future__ import annotations

import html
import os

from engine.config import Config
from engine.llm.sources import model_info
from generators import registry



def memory_mb() -> dict:
    try:
        import psutil

        info = psutil.Process(os.getpid()).memory_info()
        return {"rss_mb": round(info.rss / 2**20, 1)}
    except ImportError:
        return {"rss_mb": None}


def status(engine) -> dict:
    """The status of every role of `engine` (an engine.engine.Engine)."""
    config: Config = engine.config
    roles = {}
    for name, role in engine.roles.items():
        state, detail = role.state()
        section = getattr(config, name)
        roles[name] = {"state": state, "backend": section.backend,
                       "detail": detail or getattr(section, "model", "") or getattr(section, "voice", "")}
    state, detail = engine.perceiver.status()
    roles["perception"] = {"state": state, "detail": detail, "backend": config.perception.backend}
    for task in registry.TASKS:
        ok, detail = engine.generators.task_status(task)
        roles[f"generator:{task}"] = {"state": "ready" if ok else "unavailable", "detail": detail}
    model = model_info(config.llm)
    llm = engine.roles["llm"].loaded if "llm" in engine.roles else None
    if llm is not None and llm.decode_path is not None:
        model["decode"] = llm.decode_path  # e.g. "fast path, int8 weights (C kernel)"
    if llm is not None:
        model["serving"] = serving(llm)
    return {"profile": config.profile, "roles": roles, "model": model, "memory": memory_mb(),
            "data_dir": str(config.data_path),
            # generator modules whose import failed: their backends are missing from the roles above
            "failed_backends": registry.failed_imports()}


def serving(llm) -> dict:
    """How the model serves many requests: batched in slots (engine/llm/scheduler.py) or one at a time."""
    if not llm.schedules:
        return {"mode": "one at a time", "slots": 1}
    sched = llm.scheduler
    mean = sched.stepped_tokens / sched.steps if sched.steps else None
    return {"mode": "continuous batching", "slots": sched.capacity, "active": sched.active,
            "waiting": sched.waiting, "mean_batch": round(mean, 2) if mean else None}


def sampling_line(sampling: dict) -> str:
    """model_info's sampling in words, e.g. 'temperature 0.2 (model default), top_p 0.9 (model
    default); turns with facts: greedy'."""
    def value(name: str) -> str:
        got = sampling[name]
        text = "greedy" if name != "top_p" and got["value"] == 0 else f"{name} {got['value']:g}"
        return text + (" (model default)" if got["from"] == "model" else "")

    return f"{value('temperature')}, {value('top_p')}; turns with facts: {value('facts_temperature')}"


def model_markdown(info: dict) -> str:
    """The LLM's line in the status panel: title, licence, provenance, sampling."""
    line = f"**Model:** {html.escape(info['title'], quote=False)}  ·  " \
        f"**Licence:** {html.escape(info['license'], quote=False)}"
    if info.get("verified") is not None:
        line += "  ·  " + ("file hash matches upstream's" if info["verified"]
                           else "file hash checked against its package (upstream's not verified)")
    line += f"\n\n**Sampling:** {sampling_line(info['sampling'])}"
    if info.get("decode"):
        line += f"  ·  **Decode:** {html.escape(info['decode'], quote=False)}"
    if serve := info.get("serving"):
        line += f"  ·  **Serving:** {serve['mode']}" + (f", {serve['slots']} slots" if serve["slots"] > 1 else "")
    return line


def status_markdown(report: dict) -> str:
    """The report as Markdown. Details are HTML-escaped: Markdown takes "<local dir or hub id>"
    for a tag and drops it, which cut the setup hints short."""
    lines = [f"**Profile:** `{report['profile']}`  ·  **Memory:** {report['memory']['rss_mb']} MB RSS", ""]
    if report.get("model"):
        lines += [model_markdown(report["model"]), ""]
    lines += ["| role | state | detail |", "|---|---|---|"]
    icons = {"ready": "✅ ready", "loading": "⏳ loading", "unavailable": "⚠️ unavailable", "not loaded": "… not loaded"}
    for role, info in report["roles"].items():
        detail = html.escape(info["detail"], quote=False).replace("|", "\\|")
        lines.append(f"| {role} | {icons.get(info['state'], info['state'])} | {detail} |")
    for module, error in report.get("failed_backends", {}).items():
        detail = html.escape(error, quote=False).replace("|", "\\|")
        lines.append(f"| {module} | ⚠️ failed to import | {detail} |")
    lines.append(f"\nData directory: `{report['data_dir']}`")
    return "\n".join(lines)
