#!/usr/bin/env python3
"""llama.cpp's own programs (llama-server, llama-batched-bench, llama-bench), built for this CPU
from the sources that the llama-cpp-python sdist vendors, for bench/serving.py to run as real
processes beside ours. Built once (~10 minutes on 2 cores) into a cache keyed by version and
CPU flags; later calls return the cached paths at once.

    python bench/llamacpp_bins.py      # build (or find) them; prints their folder
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's sdist (the llama.cpp it vendors)
TARGETS = ("llama-server", "llama-batched-bench", "llama-bench")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni-assistant"


def _cpu_key() -> str:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def folder() -> Path:
    return CACHE / f"llama.cpp-{VERSION}-{_cpu_key()}"


def binaries() -> dict[str, Path] | None:
    """The built programs, or None when they are not built yet."""
    found = {name: folder() / name for name in TARGETS}
    return found if all(p.exists() for p in found.values()) else None


def build(jobs: int = os.cpu_count() or 2) -> dict[str, Path]:
    if (done := binaries()) is not None:
        return done
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(tmp), "-q"], check=True)
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        out = tmp / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(out), "-j", str(jobs), "--target", *TARGETS], check=True,
                       stdout=subprocess.DEVNULL)
        dest = folder()
        dest.mkdir(parents=True, exist_ok=True)
        for name in TARGETS:
            shutil.copy2(out / "bin" / name, dest / name)
    return binaries()


if __name__ == "__main__":
    print(build()[TARGETS[0]].parent)
