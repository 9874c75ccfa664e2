"""The Gradio app in-process, driven through gradio_client like a browser would."""
from __future__ import annotations

import threading
import time

import pytest
from gradio_client import Client, handle_file
from engine.session import Session


def _assistant_text(chat):
    last = chat[-1]
    assert last["role"] == "assistant"
    return "".join(p.get("text", "") for p in last["content"] if p.get("type") == "text")


def test_send_message_streams_text_and_stores_the_turn(server):
    client = Client(server.url + "/", verbose=False)
    job = client.submit({"text": "hello there", "files": []}, api_name="/respond")
    outputs = list(job)
    job.result()
    texts = [_assistant_text(o[0]) for o in outputs if o[0] and o[0][-1]["role"] == "assistant"]
    assert len(texts) >= 3 and texts[-1]  # several partial updates, then the answer
    assert any(0 < len(t) < len(texts[-1]) for t in texts)  # streamed, not all at once
    final_chat, _, conv_choices, footer, title = outputs[-1]
    assert final_chat[0]["role"] == "user" and "tokens" in footer and title == "hello there"
    convs = server.engine.store.list_conversations()
    assert convs and convs[0]["title"] == "hello there"
    client.close()


def test_attachment_shown_and_bad_file_gives_input_back(server, png, tmp_path):
    client = Client(server.url + "/", verbose=False)
    out = client.predict({"text": "what is this", "files": [handle_file(str(png))]}, api_name="/respond")
    chat = out[0]
    from app.panels import perception_panel

    assert any(p.get("type") == "file" for m in chat if m["role"] == "user" for p in m["content"])
    assert _assistant_text(chat)
    cid = server.engine.store.list_conversations()[0]["id"]
    pictures, facts = perception_panel(server.engine, cid)
    assert "photo.png" in facts.value and "64x48" in facts.value and pictures.value  # what it saw, and why

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 50)
    chat, box, _, footer, _ = client.predict({"text": "and this", "files": [handle_file(str(bad))]}, api_name="/respond")
    assert "broken.png" in _assistant_text(chat) and "⚠️" in _assistant_text(chat)
    box = box.get("value", box)
    assert box["text"] == "and this" and box["files"][0].endswith("broken.png")  # nothing lost: the message is back in the input
    client.close()


def test_a_file_of_a_kind_the_page_does_not_take_is_named_and_not_logged_as_a_crash(server, tmp_path, capfd):
    """The browser offers only images, audio, video and .glb; a client can upload anything else."""
    notes = tmp_path / "notes.txt"
    notes.write_text("just text")
    client = Client(server.url + "/", verbose=False)
    capfd.readouterr()
    with pytest.raises(Exception, match=r"notes\.txt is not an image, audio, video or \.glb file"):
        client.predict({"text": "read this", "files": [handle_file(str(notes))]}, api_name="/respond")
    client.close()
    assert "Traceback" not in capfd.readouterr().err


def long_answer(server, outputs: int):
    """(client, job, deadline): a long answer under way, `outputs` updates of it seen."""
    client = Client(server.url + "/", verbose=False)
    job = client.submit({"text": "tell me everything", "files": []}, api_name="/respond")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < outputs and time.monotonic() < deadline:
        time.sleep(0.05)
    return client, job, deadline


def test_stop_mid_answer_keeps_partial_marked_interrupted(long_server, answers):
    seen = answers(long_server.engine)
    client, job, deadline = long_answer(long_server, outputs=5)
    client.predict(api_name="/stop")
    chat = job.result()[0]
    text = _assistant_text(chat)
    assert text.split('<span class="turn-meta">')[0].rstrip().endswith("*(interrupted)*")  # (then the model's name)
    usage = seen[-1]
    assert usage["finish_reason"] == "cancelled" and usage["completion_tokens"] < 3000
    # the next message works
    out = client.predict({"text": "short one", "files": []}, api_name="/respond")
    assert out[0][-1]["role"] == "assistant"
    client.close()


def _turn_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ui-turn"]


def test_turn_events_come_in_order_batched_and_a_failure_still_surfaces():
    """Every event of the turn, in order, in at most one batch per frame after the first (here a
    frame outlasts the turn); the turn's exception is raised after the events before it."""
    from app.ui_chat import batched
    from engine.events import CancelToken, TextDelta

    def run():
        yield from (TextDelta(str(i)) for i in range(500))
        raise RuntimeError("boom")

    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for batch in batched(run, CancelToken(), frame_s=600):
            got.append(batch)
    assert [e.text for batch in got for e in batch] == [str(i) for i in range(500)]
    assert len(got) <= 2 and not _turn_threads()


def test_each_change_of_state_gets_its_own_redraw():
    """Text is merged into frames; a tool starting ends its batch, so the page shows it even
    when the tool finishes within the same frame."""
    from app.ui_chat import batched
    from engine.events import CancelToken, TextDelta, ToolCall

    call = ToolCall("edit_image", {})
    events = [TextDelta("a"), TextDelta("b"), call, TextDelta("c")]
    got = list(batched(lambda: iter(events), CancelToken(), frame_s=600))
    assert [e for batch in got for e in batch] == events
    assert any(batch[-1] is call for batch in got)


def test_a_page_that_goes_away_cancels_its_turn(long_server, answers):
    """The page's handler closed mid-answer (the client went away): the turn is cancelled,
    stored as interrupted and its thread is gone, as Stop would have it."""
    from app.ui_chat import batched
    from engine.events import CancelToken, TextDelta

    cancel = CancelToken()

    def decode():
        while not cancel.cancelled:
            yield TextDelta("x")

    batches = batched(decode, cancel)
    next(batches)
    batches.close()
    assert cancel.cancelled and not _turn_threads()

    seen = answers(long_server.engine)
    client, job, deadline = long_answer(long_server, outputs=3)
    job.cancel()
    client.close()
    while (not seen or _turn_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen and seen[-1]["finish_reason"] == "cancelled" and seen[-1]["completion_tokens"] < 3000
    assert not _turn_threads()


def test_a_turn_that_fails_shows_an_error_and_the_next_one_works(server, monkeypatch):
    from engine.events import TextDelta

    real = Session.submit

    def failing(self, turn, cancel=None, gate=None):
        if turn.text == "break":
            yield TextDelta("a start")
            raise RuntimeError("the turn broke")
        yield from real(self, turn, cancel, gate)

    monkeypatch.setattr(Session, "submit", failing)
    client = Client(server.url + "/", verbose=False)
    with pytest.raises(Exception):
        client.predict({"text": "break", "files": []}, api_name="/respond")
    assert not _turn_threads()
    out = client.predict({"text": "and now?", "files": []}, api_name="/respond")
    assert _assistant_text(out[0])
    client.close()


def test_conversations_new_reopen_rename_delete(server):
    client = Client(server.url + "/", verbose=False)
    store = server.engine.store
    before = {c["id"] for c in store.list_conversations()}
    client.predict({"text": "first topic", "files": []}, api_name="/respond")
    client.predict(api_name="/new_chat")
    client.predict({"text": "second topic", "files": []}, api_name="/respond")
    created = [c for c in store.list_conversations() if c["id"] not in before]
    assert [c["title"] for c in created] == ["second topic", "first topic"]
    first = created[1]["id"]

    chat, title, _ = client.predict(first, api_name="/open_conversation")
    assert title == "first topic" and chat[0]["content"][0]["text"] == "first topic"
    client.predict("Renamed topic", api_name="/rename")
    assert store.get_conversation(first)["title"] == "Renamed topic"
    chat, *_ = client.predict(api_name="/delete")
    assert chat == [] and store.get_conversation(first) is None
    assert store.get_conversation(created[0]["id"]) is not None
    client.close()


def test_media_tools_show_results_inline(server, png):
    from app.panels import media_panel

    client = Client(server.url + "/", verbose=False)
    outputs = list(client.submit({"text": "crop it to a square", "files": [handle_file(str(png))]},
                                 api_name="/respond"))
    chat = outputs[-1][0]
    results = [p for m in chat if m["role"] == "assistant" for p in m["content"] if p.get("type") == "file"]
    assert results and str(results[0]["file"]).endswith(".png"), results
    assert "Here is the image" in _assistant_text(chat)
    assert any("🛠️ edit image" in _assistant_text(o[0]) for o in outputs if o[0])  # progress was shown
    chat = client.predict({"text": "make a 3D model of a snowman", "files": []}, api_name="/respond")[0]
    kinds = [p.get("component") or p.get("type") for m in chat if m["role"] == "assistant" for p in m["content"]]
    assert "model3d" in [str(k).lower() for k in kinds], kinds
    cid = server.engine.store.list_conversations()[0]["id"]
    gallery, model, files = media_panel(server.engine, cid)
    assert len(gallery.value) == 2 and ".glb" in str(model.value) and len(files) == 3
    client.close()


def test_page_names_no_conversation_before_login(tmp_path):
    """With a token set, the page served before login holds nothing of the store: the
    conversation list and the status are filled by demo.load, after the login."""
    import httpx

    from tests.conftest import running_server

    from engine.store import Store

    store = Store(tmp_path / "data")  # a conversation from an earlier run
    cid = store.create_conversation("my private topic")
    store.close()
    with running_server(tmp_path / "data", auth_token="a-long-enough-secret-token") as srv:
        html = httpx.get(srv.url + "/", timeout=30).text
        assert cid not in html and "my private topic" not in html
        assert str(srv.engine.config.data_path) not in html


def test_panels_and_experts_follow_the_conversation(engine, png):
    """Each panel reads the conversation it is given; the Experts panel reads that
    conversation's last answer, never the engine's last answer of any conversation."""
    from app.panels import media_panel, named_files, perception_panel, router_panel
    from engine.events import CancelToken
    from engine.session import Turn

    seen = Session(engine, None)
    list(seen.submit(Turn("crop it to a square", (str(png),)), CancelToken()))
    plain = Session(engine, None)
    list(plain.submit(Turn("hello"), CancelToken()))
    gallery, model, files = media_panel(engine, plain.id)
    assert not gallery.value and not model.value and not files
    assert not perception_panel(engine, plain.id)[0].value
    image, line = router_panel(engine, plain.id)
    assert image is None and "3 tokens" not in line
    gallery, _, files = media_panel(engine, seen.id)
    assert len(gallery.value) == 2
    shown = named_files().postprocess(files).root
    assert [f.orig_name for f in shown] == ["photo.png", "photo-crop.png"]  # named from the request, not by hash
    stored = {"layers": {"0": {"text": {"counts": [4, 0], "tokens": 4}}}, "num_experts": 2, "top_k": 1}
    engine.store.add_turn(seen.id, "assistant", "an MoE answer", meta={"router_stats": stored})
    image, line = router_panel(engine, seen.id)
    assert image is not None and "text (4 tokens)" in line


def test_setup_hint_is_one_plain_sentence(tmp_path, monkeypatch):
    """No diffusion model configured: the chat gets what is missing and the one setting that
    adds it; the detail (and any server path) goes to the status panel, shown whole."""
    from engine.config import load_config
    from engine.engine import Engine
    from engine.events import CancelToken, TextDelta
    from engine.session import Turn
    from engine.status import status, status_markdown

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.delenv("OMNI_GEN_IMAGE_MODEL", raising=False)
    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path / "data"), "generators.image_model": ""},
                             env={}))
    try:
        events = list(Session(eng, None).submit(Turn("draw a lighthouse at dusk"), CancelToken()))
        answer = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert answer == ("Text-to-image needs a diffusion model, and none is on this machine: get one with "
                          "`hf download stabilityai/sdxl-turbo`, or start with --set generators.image_model=FOLDER "
                          "(a local model folder).")
        markdown = status_markdown(status(eng))
        row = next(line for line in markdown.splitlines() if line.startswith("| generator:image "))
        assert "generators.image_model=&lt;local dir or hub id&gt;" in row and "empty-hub-cache" in row
    finally:
        eng.close()


def test_voice_settings_refuse_a_voice_that_does_not_exist(server):
    from app.ui import voice_problem

    assert voice_problem("joe-us") is None
    problem = voice_problem("no-such-voice")
    assert "no-such-voice" in problem and "joe-us" in problem and "unavailable" not in problem
    client = Client(server.url + "/", verbose=False)
    before = server.engine.config.tts.voice
    client.predict("no-such-voice", 1.0, api_name="/set_voice")
    assert server.engine.config.tts.voice == before
    client.close()


def test_media_replies_show_no_token_count():
    from app.ui_chat import turn_footer
    from engine.events import Done

    assert "tokens" not in turn_footer(Done({}, {}))
    assert "12 tokens" in turn_footer(Done({"completion_tokens": 12}, {"decode_tok_s": 3.0}))
