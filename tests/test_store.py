import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from engine.media import ingest
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_conversations_crud_and_reopen(tmp_path, png):
    store = Store(tmp_path)
    a, b = store.create_conversation("first"), store.create_conversation()
    rec = ingest(png, store.media_dir, 10**6)
    store.add_turn(a, "user", "hello", media=(rec,))
    store.add_turn(a, "assistant", "hi!", status="interrupted", meta={"usage": {"completion_tokens": 2}})
    store.rename_conversation(b, "  second   chat ")
    store.close()

    store = Store(tmp_path)
    convs = {c["id"]: c for c in store.list_conversations()}
    assert convs[a]["title"] == "first" and convs[b]["title"] == "second chat" and convs[a]["turns"] == 2
    turns = store.turns(a)
    assert [(t.role, t.content, t.status) for t in turns] == [("user", "hello", "complete"), ("assistant", "hi!", "interrupted")]
    assert turns[0].media[0].sha256 == rec.sha256 and Path(turns[0].media[0].path).exists()
    assert turns[1].meta["usage"]["completion_tokens"] == 2
    store.delete_conversation(a)
    assert store.turns(a) == [] and [c["id"] for c in store.list_conversations()] == [b]
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"


def test_sigkill_loses_no_committed_turn(tmp_path):
    """A child commits turns, reports each, and is SIGKILLed mid-stream."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from engine.store import Store
        s = Store(sys.argv[1])
        cid = s.create_conversation("killed")
        i = 0
        while True:
            s.add_turn(cid, "user", f"turn {{i}}")
            print(i, flush=True)
            i += 1
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    last = -1
    for line in child.stdout:
        last = int(line)
        if last >= 200:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    store = Store(tmp_path)
    (conv,) = store.list_conversations()
    turns = store.turns(conv["id"])
    assert len(turns) >= last + 1  # every turn reported as committed is there
    assert [t.content for t in turns[: last + 1]] == [f"turn {i}" for i in range(last + 1)]


def test_rename_to_blank_is_refused(tmp_path):
    import pytest

    store = Store(tmp_path)
    cid = store.create_conversation("x")
    with pytest.raises(ValueError, match="cannot be empty"):
        store.rename_conversation(cid, "   ")


def test_server_killed_with_sigkill_keeps_answered_turns(tmp_path, tiny_cli):
    """The real app process: answer a turn through the UI API, kill -9, reopen the data."""
    import time

    import httpx
    from gradio_client import Client

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "run_app.py", "--profile", "tiny", *tiny_cli(tmp_path),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = Client(url, verbose=False)
        chat = client.predict({"text": "remember me", "files": []}, api_name="/respond")[0]
        client.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    store = Store(tmp_path)
    (conv,) = store.list_conversations()
    turns = store.turns(conv["id"])
    assert [t.role for t in turns] == ["user", "assistant"] and turns[0].content == "remember me"
    assert turns[1].content and turns[1].content in chat[-1]["content"][0]["text"]


def test_spoken_media_are_marked_on_the_record_not_by_file_name(tmp_path, png):
    """The conversation's own speech (a voice message, a spoken answer) is a field on the
    stored record: "it" never means it, whatever the file is called; a database from before
    the field gets it, with the spoken files of then marked."""
    import sqlite3
    from dataclasses import replace

    from engine.tools.plan import conversation_media

    store = Store(tmp_path)
    cid = store.create_conversation()
    rec = ingest(png, store.media_dir, 10**6, "answer.png")
    store.add_turn(cid, "user", "hi", media=(replace(rec, spoken=True),))
    store.add_turn(cid, "assistant", "here", media=(replace(rec, name="answer.wav"),))
    assert [m.spoken for t in store.turns(cid) for m in t.media] == [True, False]
    assert [m.name for _, m in conversation_media(store, cid)] == ["answer.wav"]
    store.close()

    db = sqlite3.connect(tmp_path / "conversations.sqlite3")  # as an older version left it
    db.executescript("CREATE TABLE old AS SELECT turn_id, sha256, name, position FROM turn_media;"
                     "DROP TABLE turn_media; ALTER TABLE old RENAME TO turn_media;")
    db.close()
    store = Store(tmp_path)
    assert [m.spoken for t in store.turns(cid) for m in t.media] == [False, True]  # by the names of then
    store.close()
