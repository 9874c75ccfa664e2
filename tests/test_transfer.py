"""Export / import of conversations (engine/transfer.py) and full-text search (engine/search.py)."""
from __future__ import annotations

import base64
import json
import sqlite3
import zipfile
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.media import ingest
from engine.search import fts_query, search
from engine.store import Store
from engine.transfer import export_json, export_markdown, import_json

LIMIT = 10 * 1_000_000


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def branched(store, png):
    """Two branches: an answer regenerated, the first one shown; settings; an image."""
    cid = store.create_conversation("Lighthouse trip")
    rec = ingest(png, store.media_dir, LIMIT, "photo.png")
    q = store.add_turn(cid, "user", "What is in this photo?", media=(rec,))
    a1 = store.add_turn(cid, "assistant", "A red square, like a lighthouse lantern.", meta={"model": "tiny"})
    store.add_turn(cid, "user", "And the keeper?")
    store.add_turn(cid, "assistant", "Nobody is keeping it.", status="interrupted")
    store.add_turn(cid, "assistant", "A plain red picture.", parent=q)  # regenerated: a sibling of a1
    store.show(cid, a1)
    store.set_settings(cid, {"instructions": "Answer like a sailor.", "temperature": 0.3})
    return cid


def shape(store, cid):
    """A conversation's tree by position (ids differ between copies)."""
    tree = store.tree(cid)
    pos = {t.id: i for i, t in enumerate(tree)}
    return ([(t.role, t.content, t.status, None if t.parent_id is None else pos[t.parent_id],
              [(m.name, m.kind, m.sha256, Path(m.path).read_bytes()) for m in t.media]) for t in tree],
            pos[store.head(cid)])


def state(store):
    files = sorted(str(p) for p in store.media_dir.rglob("*") if p.is_file())
    return len(store.list_conversations()), store._query("SELECT COUNT(*) FROM turns")[0][0], files


def test_json_round_trip_keeps_every_branch_the_shown_one_settings_and_media(store, branched, tmp_path):
    path = export_json(store, branched, tmp_path / "out")
    assert path.name == "Lighthouse trip.json"
    doc = json.loads(path.read_text())
    assert len(doc["turns"]) == 5 and doc["media"][0]["name"] == "photo.png"
    assert base64.b64decode(doc["media"][0]["data"]) == (tmp_path / "photo.png").read_bytes()

    other = Store(tmp_path / "elsewhere")  # another machine: the media is not there yet
    imported = import_json(other, path, LIMIT)
    assert imported.conversation_id != branched and imported.turns == 5 and imported.media == 1
    assert shape(other, imported.conversation_id) == shape(store, branched)
    assert other.settings(imported.conversation_id) == {"instructions": "Answer like a sailor.", "temperature": 0.3}
    assert other.get_conversation(imported.conversation_id)["title"] == "Lighthouse trip"
    assert [t.content for t in other.turns(imported.conversation_id)][-1] == "Nobody is keeping it."
    assert other.tree(imported.conversation_id)[1].meta == {"model": "tiny"}
    # into the same store: a second, independent conversation, the media file shared
    again = import_json(store, path, LIMIT)
    assert shape(store, again.conversation_id) == shape(store, branched)
    assert len(store.list_conversations()) == 2
    other.close()


def test_a_model_not_installed_here_is_dropped_with_a_note(store, branched, tmp_path):
    store.set_settings(branched, {"model": "huge-70b"})
    imported = import_json(store, export_json(store, branched, tmp_path), LIMIT, models=["tiny"])
    assert store.settings(imported.conversation_id) == {} and "huge-70b" in imported.notes[0]


def test_markdown_zip_has_the_shown_branch_and_its_media_beside_it(store, branched, tmp_path):
    path = export_markdown(store, branched, tmp_path)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["conversation.md", "photo.png"]
        md = z.read("conversation.md").decode()
        assert z.read("photo.png") == (tmp_path / "photo.png").read_bytes()
    assert md.startswith("# Lighthouse trip") and "![photo.png](photo.png)" in md
    assert "lighthouse lantern" in md and "Nobody is keeping it." in md and "*(interrupted)*" in md
    assert "A plain red picture." not in md  # the other branch is not the one shown
    assert "> Answer like a sailor." in md


def exported(store, cid, tmp_path) -> dict:
    return json.loads(export_json(store, cid, tmp_path / "x").read_text())


def hostile(doc) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def cases(good: dict):
    def edit(fn):
        doc = json.loads(json.dumps(good))
        fn(doc)
        return doc

    not_image = base64.b64encode(b"just some text, certainly no picture\n" * 10).decode()
    import hashlib
    sha = hashlib.sha256(base64.b64decode(not_image)).hexdigest()

    def text_as_image(d):
        d["media"][0].update(data=not_image, sha256=sha)
        d["turns"][0]["media"][0]["sha256"] = sha

    return {
        "not JSON": (b"this is not json {", "not valid JSON"),
        "not text": (b"\xff\xfe\x00\x00garbage\x81", "not"),
        "not an export": ({"turns": []}, "not a conversation exported"),
        "newer version": (edit(lambda d: d.update(version=9)), "newer version"),
        "turns not a list": (edit(lambda d: d.update(turns={"a": 1})), "'turns' must be a list"),
        "wrong role type": (edit(lambda d: d["turns"][1].update(role=5)), "turn 2: its role"),
        "content not text": (edit(lambda d: d["turns"][2].update(content=["x"])), "turn 3's content must be text"),
        "forward parent": (edit(lambda d: d["turns"][0].update(parent=d["turns"][3]["id"])),
                           "turn 1: its parent"),
        "parent cycle": (edit(lambda d: [d["turns"][0].update(parent=d["turns"][1]["id"]),
                                         d["turns"][1].update(parent=d["turns"][0]["id"])]), "a later turn"),
        "self parent": (edit(lambda d: d["turns"][2].update(parent=d["turns"][2]["id"])), "itself"),
        "unknown head": (edit(lambda d: d.update(head=10**9)), "'head'"),
        "bad base64": (edit(lambda d: d["media"][0].update(data="@@not base64@@")),
                       "media file 1 (photo.png): its data is not valid base64"),
        "sha mismatch": (edit(lambda d: d["media"][0].update(data=not_image)), "does not match its sha256"),
        "unknown media": (edit(lambda d: d["turns"][0]["media"][0].update(sha256="0" * 64)),
                          "turn 1's media file 1 refers to no media file"),
        "not an image": (edit(text_as_image), "media file 1 (photo.png)"),
        "router stats bomb": (edit(lambda d: d["turns"][1]["meta"].update(
            router_stats={"layers": {}, "num_experts": 10**9, "top_k": 2})), "router_stats"),
        "tool not an object": (edit(lambda d: d["turns"][1]["meta"].update(tool="generate_image")), "'tool'"),
        "too many turns": (edit(lambda d: d.update(turns=d["turns"] * 2000)), "at most 5,000"),
        "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "too many values": (b"[" + b"[]," * 5_000_000 + b"[]]", "too many values", 20 * 1_000_000),
        "too big": (b" " * (LIMIT + 1), "the limit for an import is 10 MB"),
    }


def test_hostile_imports_are_refused_clearly_and_change_nothing(store, branched, tmp_path):
    good = exported(store, branched, tmp_path)
    before = state(store)
    for what, (doc, message, *limit) in cases(good).items():
        path = tmp_path / "hostile.json"
        path.write_bytes(hostile(doc))
        with pytest.raises(InputError) as err:
            import_json(store, path, limit[0] if limit else LIMIT)
        assert message in str(err.value), (what, str(err.value))
        assert str(tmp_path) not in str(err.value)  # no server path in a message
        assert state(store) == before, what


def test_a_failed_import_removes_the_media_it_wrote(store, branched, tmp_path):
    """The first media file is sound and stored, the second is not: no file of it stays."""
    from PIL import Image

    doc = exported(store, branched, tmp_path)
    fresh = tmp_path / "fresh.png"
    Image.new("RGB", (10, 10), (0, 200, 0)).save(fresh)
    import hashlib
    raw = fresh.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    doc["media"].insert(0, {"sha256": sha, "name": "fresh.png", "kind": "image", "data": base64.b64encode(raw).decode()})
    doc["turns"][2]["media"] = [{"sha256": sha, "name": "fresh.png"}]
    doc["media"][1]["kind"] = "audio"  # the photo said to be a sound: refused after fresh.png was stored
    path = tmp_path / "half.json"
    path.write_text(json.dumps(doc))
    before = state(store)
    with pytest.raises(InputError, match="said to be audio but its content is image"):
        import_json(store, path, LIMIT)
    assert state(store) == before and not list(store.media_dir.rglob(f"{sha}*"))


def test_search_finds_old_answers_by_word_and_prefix_and_takes_any_text(store, branched):
    other = store.create_conversation("Recipes")
    store.add_turn(other, "user", "How long do I boil pasta?")
    store.add_turn(other, "assistant", "About nine minutes (al dente) — taste it: AND salt the water!")
    hits = search(store, "lantern")  # a word of an old answer
    assert [h.conversation_id for h in hits] == [branched]
    assert "<mark>lantern</mark>" in hits[0].snippet_html
    assert [h.conversation_id for h in search(store, "lanter")] == [branched]  # prefix of the last word
    assert [h.conversation_id for h in search(store, "plain red")] == [branched]  # the other branch too
    assert search(store, "recip")[0].title_html == "<mark>Recipes</mark>"
    for query in ('"', 'AND', 'pasta AND', '(boil', 'NEAR(x y', 'water:', '*', '-salt', '^a', 'a"b"c', '\x00', ''):
        search(store, query)  # FTS syntax in a query is just text: never an error
    assert [h.conversation_id for h in search(store, "AND salt")] == [other]
    assert fts_query('he said "hi" AND (bye') == '"he" "said" "hi" "AND" "bye"*'
    store.rename_conversation(other, "Dinner <b>plans</b>")
    (hit,) = search(store, "plans")
    assert hit.title_html == "Dinner &lt;b&gt;<mark>plans</mark>&lt;/b&gt;"  # escaped, then marked
    store.delete_conversation(other)
    assert search(store, "pasta") == [] and search(store, "plans") == []


def test_an_existing_database_gets_indexed_once(tmp_path):
    """A database made before search existed (no search tables or triggers) is backfilled."""
    store = Store(tmp_path)
    cid = store.create_conversation("Old times")
    store.add_turn(cid, "assistant", "the harbour was quiet")
    store.close()
    db = sqlite3.connect(tmp_path / "conversations.sqlite3")
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%search%'")]
    for name in names:
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DROP TABLE turn_search")
    db.execute("DROP TABLE title_search")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert [h.conversation_id for h in search(store, "harbour")] == [cid]
    assert [h.conversation_id for h in search(store, "old tim")] == [cid]
    store.close()
    store = Store(tmp_path)  # opened again: not indexed twice
    assert store._query("SELECT COUNT(*) FROM turn_search")[0][0] == 1
    store.close()
