#!/usr/bin/env python3
"""`make gpu-wheels`: the wheels the lent GPU machine lacks, into .whl/ (ignored by git).

That machine (../shared/GPU.md) has Python 3.12, torch 2.11+cu130, transformers 5.17,
accelerate 1.15, huggingface-hub 1.33, requests, psutil, pytest(-timeout), pillow,
opencv, numpy, scipy; it reaches no package registry. What the gpu tests and
bench/gpu_check.py's steps import beyond that:
  bitsandbytes  4-bit layers and the NF4 dequantize kernel (not in the image)
  diffusers     every diffusion backend (not in the image)
  transformers  5.24: the engine's token loop passes `cache=` and reads `out.cache`,
                which 5.17 does not have (the project pins >=5.24)
Everything else those paths import is in the image (checked by running the gpu
tests' files and the benches against a copy of its package list).

The working tree that travels is 64 MiB in all, so bitsandbytes' wheel (41 MiB:
one library per CUDA and ROCm version) is rewritten without the libraries the
image's torch (CUDA 13.0) cannot load: the CPU and CUDA 13.x ones stay.

    python3 bench/gpu_wheels.py [--dest .whl]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = {"bitsandbytes": "0.50.2", "diffusers": "0.42.1", "transformers": "5.24.0"}
KEEP_LIBS = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the image's torch is cu130
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
LIMIT_MIB = 40  # of the 64 MiB that travel; the repository itself takes ~2


def wheel_of(dest: Path, name: str, version: str) -> Path | None:
    found = sorted(dest.glob(f"{name}-{version}-*.whl"))
    return found[0] if found else None


def download(dest: Path, name: str, version: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), f"{name}=={version}"]
    subprocess.run(cmd, check=True)
    path = wheel_of(dest, name, version)
    if path is None:
        raise SystemExit(f"pip downloaded no {name} {version} wheel into {dest}")
    return path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_bitsandbytes(path: Path) -> list[str]:
    """Rewrite the wheel in place without the CUDA/ROCm/XPU libraries torch cu130 never loads;
    RECORD is rewritten to match. Returns the names dropped (none when already slim)."""
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        drop = [n for n in names if n.endswith(".so") and "libbitsandbytes_" in n and not KEEP_LIBS.search(n)]
        if not drop:
            return []
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        tmp = path.with_suffix(".tmp")
        lines = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in drop or info.filename == record:
                    continue
                data = src.read(info)
                out.writestr(info, data)
                lines.append(_record_line(info.filename, data))
            out.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    tmp.replace(path)
    return drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for name, version in WHEELS.items():
        path = wheel_of(dest, name, version) or download(dest, name, version)
        wanted.add(path.name)
        if name == "bitsandbytes" and (dropped := slim_bitsandbytes(path)):
            print(f"{path.name}: dropped {len(dropped)} libraries torch cu130 cannot load")
    for stray in dest.glob("*.whl"):  # one version of each: two would stop the install there
        if stray.name not in wanted:
            stray.unlink()
            print(f"removed {stray.name} (not in the pinned set)")
    total = 0
    for path in sorted(dest.glob("*.whl")):
        total += path.stat().st_size
        print(f"{path.stat().st_size / 2**20:6.1f} MiB  {path.name}")
    print(f"{total / 2**20:6.1f} MiB  in {dest}")
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"the wheels take {total / 2**20:.1f} MiB; keep them under {LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
