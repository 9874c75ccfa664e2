"""bench/gpu_check.py's plumbing, without a GPU: the dry run skips every CUDA step with its
reason and exits 0; a step that fails or outruns its cap is recorded and the run goes on;
the junit report becomes pytest.json; the bitsandbytes wheel is trimmed with a valid RECORD."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["install", "pytest", "moe", "omni", "diffusion"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_skips_every_cuda_step_with_its_reason(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a dry run even where a GPU is visible
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--wheels", str(tmp_path / "none")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == STEPS
    assert summary["counts"] == {"ok": 0, "failed": 0, "timed_out": 0, "skipped": 5}
    install = summary["steps"]["install"]["reason"]
    assert "make gpu-wheels" in install or "torch is not importable" in install
    for name in STEPS[1:]:
        reason = summary["steps"][name]["reason"]
        assert "no CUDA device" in reason or "torch is not importable" in reason
        assert f"[gpu-check] {name}: skipped ({reason})" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.json"]  # 8 files at most come back


def test_only_names_known_steps(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path), "--only", "moe,gpus"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "gpus" in done.stderr and "steps are install, pytest" in done.stderr


def test_a_failing_or_slow_step_is_recorded_and_the_run_goes_on(tmp_path):
    check = load("gpu_check")
    env = dict(os.environ)
    with open(tmp_path / "log.txt", "w") as log:
        failed = check.run_step("x", [sys.executable, "-c", "raise ValueError('bad weights')"], 30, env, log)
        slow = check.run_step("y", [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(30)"],
                              1, env, log)
    assert failed["status"] == "failed" and "ValueError: bad weights" in failed["error"]
    assert slow["status"] == "timed_out" and slow["wall_s"] < 10
    log = (tmp_path / "log.txt").read_text()
    assert "===== x: failed" in log and "working" in log and "===== y: timed_out" in log


def test_the_junit_report_becomes_counts_and_failures(tmp_path):
    check = load("gpu_check")
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_gpu" name="test_a" time="1.5"/>
      <testcase classname="tests.test_gpu" name="test_b" time="0.2">
        <failure message="assert 0.4 &lt; 0.15">trace</failure></testcase>
      <testcase classname="tests.test_moe" name="test_c" time="0"><skipped message="needs CUDA"/></testcase>
      <testcase classname="tests.test_moe" name="test_d" time="0"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>""")
    got = check.junit_summary(xml)
    assert {k: got[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == \
        {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert [f["test"] for f in got["failures"]] == ["tests.test_gpu::test_b", "tests.test_moe::test_d"]
    assert got["failures"][0]["message"] == "assert 0.4 < 0.15"
    assert check.junit_summary(tmp_path / "missing.xml")["tests"] == 0
    assert "tests/test_gpu.py" in check.gpu_test_files()


def test_the_bitsandbytes_wheel_keeps_only_the_cpu_and_cuda13_libraries(tmp_path):
    wheels = load("gpu_wheels")
    path = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 100 for v in ("cpu", "cuda118", "cuda128", "cuda130",
                                                                                   "cuda132", "rocm72")}
    files["bitsandbytes/__init__.py"] = b"__version__ = '0.50.2'\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "stale\n")
    dropped = wheels.slim_bitsandbytes(path)
    assert sorted(Path(d).name for d in dropped) == ["libbitsandbytes_cuda118.so", "libbitsandbytes_cuda128.so",
                                                      "libbitsandbytes_rocm72.so"]
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:  # every kept file listed with its real hash and size
            name, digest, size = line.split(",")
            data = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
    kept = {Path(n).name for n in names if n.endswith(".so")}
    assert kept == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}
    assert len(record) == len(names)  # the kept files and RECORD itself
    assert wheels.slim_bitsandbytes(path) == []  # already slim: untouched
