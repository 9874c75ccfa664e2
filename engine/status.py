"""What the status panel and /v1/status show: profile, each role, memory."""
from __future__ import annotations

import html
import os

from engine.config import Config
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
    return {"profile": config.profile, "roles": roles, "memory": memory_mb(),
            "data_dir": str(config.data_path)}


def status_markdown(report: dict) -> str:
    """The report as Markdown. Details are HTML-escaped: Markdown takes "<local dir or hub id>"
    for a tag and drops it, which cut the setup hints short."""
    lines = [f"**Profile:** `{report['profile']}`  ·  **Memory:** {report['memory']['rss_mb']} MB RSS",
             "", "| role | state | detail |", "|---|---|---|"]
    icons = {"ready": "✅ ready", "loading": "⏳ loading", "unavailable": "⚠️ unavailable", "not loaded": "… not loaded"}
    for role, info in report["roles"].items():
        detail = html.escape(info["detail"], quote=False).replace("|", "\\|")
        lines.append(f"| {role} | {icons.get(info['state'], info['state'])} | {detail} |")
    lines.append(f"\nData directory: `{report['data_dir']}`")
    return "\n".join(lines)
