"""What the status panel and /v1/status show: profile, each role, memory."""
from __future__ import annotations

import os

from engine.config import Config
from generators import registry

# Roles whose engines arrive in later versions; say so plainly.
PLANNED = {
    "asr": "speech recognition is not built into this version yet (voice mode is coming); nothing to set",
    "tts": "speech synthesis is not built into this version yet (voice mode is coming); nothing to set",
    "vad": "voice activity detection is not built into this version yet (voice mode is coming); nothing to set",
    "vision": "image/audio/video understanding is not built into this version yet; nothing to set",
}


def memory_mb() -> dict:
    try:
        import psutil

        info = psutil.Process(os.getpid()).memory_info()
        return {"rss_mb": round(info.rss / 2**20, 1)}
    except ImportError:
        return {"rss_mb": None}


def status(config: Config, llm_state: tuple[str, str]) -> dict:
    state, detail = llm_state
    roles = {"llm": {"state": state, "detail": detail, "backend": config.llm.backend}}
    for role, why in PLANNED.items():
        roles[role] = {"state": "unavailable", "detail": why, "backend": getattr(config, role).backend}
    for task in config.generators:
        ok, detail = registry.task_status(task)
        roles[f"generator:{task}"] = {"state": "ready" if ok else "unavailable", "detail": detail}
    return {"profile": config.profile, "roles": roles, "memory": memory_mb(),
            "data_dir": str(config.data_path)}


def status_markdown(report: dict) -> str:
    lines = [f"**Profile:** `{report['profile']}`  ·  **Memory:** {report['memory']['rss_mb']} MB RSS",
             "", "| role | state | detail |", "|---|---|---|"]
    icons = {"ready": "✅ ready", "loading": "⏳ loading", "unavailable": "⚠️ unavailable", "not loaded": "… not loaded"}
    for role, info in report["roles"].items():
        detail = info["detail"].replace("|", "\\|")
        lines.append(f"| {role} | {icons.get(info['state'], info['state'])} | {detail} |")
    lines.append(f"\nData directory: `{report['data_dir']}`")
    return "\n".join(lines)
