"""The Gradio app in-process, driven through gradio_client like a browser would."""
from __future__ import annotations

import time

from gradio_client import Client, handle_file


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
    from app.ui import perception_panel

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


def test_stop_mid_answer_keeps_partial_marked_interrupted(long_server):
    client = Client(long_server.url + "/", verbose=False)
    job = client.submit({"text": "tell me everything", "files": []}, api_name="/respond")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/stop")
    chat = job.result()[0]
    text = _assistant_text(chat)
    assert text.rstrip().endswith("*(interrupted)*")
    usage = long_server.engine.last_usage
    assert usage["finish_reason"] == "cancelled" and usage["completion_tokens"] < 3000
    # the next message works
    out = client.predict({"text": "short one", "files": []}, api_name="/respond")
    assert out[0][-1]["role"] == "assistant"
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
    from app.ui import media_panel

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
    assert len(gallery.value) == 2 and ".glb" in str(model.value) and len(files.value) == 3
    client.close()
