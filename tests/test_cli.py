"""`python run_app.py chat`: the engine from a terminal, as scripts use it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def chat(tiny_cli):
    """chat(*args, data=DIR): `run_app.py chat` in a child process on the tiny model
    (tests/conftest.py tiny_cli: its checkpoint folder, the kernel already built)."""
    def run(*args, data):
        cmd = [sys.executable, "run_app.py", "chat", "--profile", "tiny", *tiny_cli(data), *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)

    return run


def test_json_events_one_per_line(chat, tmp_path):
    out = chat("--json", "hello there", data=tmp_path)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[0]["type"] == "text_delta" and events[-1]["type"] == "done"
    assert {e["type"] for e in events[:-1]} == {"text_delta"}
    done = events[-1]
    assert done["usage"]["completion_tokens"] > 0 and done["conversation_id"]

    again = chat("--json", "--conversation", done["conversation_id"], "and more", data=tmp_path)
    assert json.loads(again.stdout.splitlines()[-1])["conversation_id"] == done["conversation_id"]


def test_plain_mode_streams_text_and_attachments_work(chat, tmp_path, png):
    out = chat("--attach", str(png), "what is this?", data=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "[seen in photo.png] Image photo.png, 64x48" in out.stderr and "conversation:" in out.stderr


def test_bad_attachment_is_an_error_event_and_exit_1(chat, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    out = chat("--json", "--attach", str(bad), "look", data=tmp_path)
    assert out.returncode == 1
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[0]["type"] == "error" and "x.png" in events[0]["message"]
    assert "Traceback" not in out.stderr


def test_unknown_conversation_and_bad_flag(chat, tmp_path):
    out = chat("--json", "--conversation", "nope", "hi", data=tmp_path)
    assert out.returncode == 1 and "no conversation" in out.stdout
    out = chat("--port", "abc", "hi", data=tmp_path)
    assert out.returncode == 2 and "expected int" in out.stderr


def test_attach_and_edit_prints_a_media_result(tiny_cli, tmp_path, png):
    from PIL import Image

    out = subprocess.run([sys.executable, str(ROOT / "run_app.py"), "chat", "--profile", "tiny", *tiny_cli(tmp_path),
                          "--json", "--attach", str(png), "crop it to a square"],
                         capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    result = next(e for e in events if e["type"] == "media_result")
    w, h = Image.open(result["path"]).size
    assert w == h and result["kind"] == "image" and result["meta"]["backend"] == "opencv"
    assert events[-1]["type"] == "done" and out.returncode == 0
