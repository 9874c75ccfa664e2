"""Conversations as trees: regenerate, edit a sent message, switch branches, per-conversation
settings, and the migration of a database made before any of it (tiny model)."""
from __future__ import annotations

import sqlite3

import pytest

from engine.events import Done, Error
from engine.session import Session, Turn
from engine.store import Store


def _drain(events) -> Done:
    done = None
    for event in events:
        assert not isinstance(event, Error), event.message
        done = event if isinstance(event, Done) else done
    return done


@pytest.fixture
def seen(engine, prompts):
    """What the model was asked each time: (messages, params)."""
    return prompts(engine)


def _contents(session) -> list[str]:
    return [t.content for t in session.engine.store.turns(session.id)]


def test_regenerate_keeps_the_earlier_answer_and_switches_back(engine, seen):
    session = Session(engine)
    _drain(session.submit(Turn("first question")))
    done = _drain(session.submit(Turn("second question")))
    first_answer = engine.store.turns(session.id)[-1]
    again = _drain(session.regenerate(done.turn_id))
    store = engine.store
    shown = store.turns(session.id)
    assert [t.role for t in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[-1].id == again.turn_id != done.turn_id and shown[-1].parent_id == shown[2].id
    assert store.alternatives(session.id)[again.turn_id] == [done.turn_id, again.turn_id]
    # asked again with the same history (the branch before the question), sampled with a fresh seed
    (before, p1), (after, p2) = seen[-2:]
    assert before == after and p2.temperature >= 0.7 and p2.seed != p1.seed
    store.show(session.id, done.turn_id)  # "< 1/2": the first answer again
    assert store.turns(session.id)[-1] == first_answer
    _drain(session.submit(Turn("third")))  # a new message goes after the answer shown
    assert store.turns(session.id)[-2].parent_id == done.turn_id
    assert len(store.tree(session.id)) == 7


def test_edit_branches_and_the_model_reads_only_the_new_branch(engine, seen):
    session = Session(engine)
    _drain(session.submit(Turn("my name is Ada")))
    _drain(session.submit(Turn("what is my name?")))
    first = engine.store.turns(session.id)[0]
    # edit the first message: a sibling of it, with nothing before it
    _drain(session.submit(Turn("my name is Grace"), parent=0))
    assert _contents(session)[0] == "my name is Grace" and len(_contents(session)) == 2
    messages, _ = seen[-1]
    assert [m["content"] for m in messages[1:]] == ["my name is Grace"]
    edited = engine.store.turns(session.id)[0]
    assert engine.store.alternatives(session.id)[edited.id] == [first.id, edited.id]
    _drain(session.submit(Turn("and my name?")))
    messages, _ = seen[-1]
    assert "Ada" not in str(messages) and "my name is Grace" in str(messages)
    # back to the first branch: the whole of it, down to its last answer
    engine.store.show(session.id, first.id)
    assert _contents(session)[:3] == ["my name is Ada", _contents(session)[1], "what is my name?"]
    # an edit of the second message goes after the first answer
    answer = engine.store.turns(session.id)[1]
    _drain(session.submit(Turn("what is my surname?"), parent=answer.id))
    messages, _ = seen[-1]
    assert [m["content"] for m in messages[1:]][0] == "my name is Ada" and "what is my name?" not in str(messages)


def test_bad_branch_points_are_errors_and_store_nothing(engine):
    session = Session(engine)
    _drain(session.submit(Turn("hello")))
    count = len(engine.store.tree(session.id))
    events = list(session.submit(Turn("x"), parent=10_000))
    assert isinstance(events[0], Error) and "no turn 10000" in events[0].message
    events = list(session.regenerate(engine.store.turns(session.id)[0].id))  # a user turn: not an answer
    assert isinstance(events[0], Error)
    assert len(engine.store.tree(session.id)) == count


def test_conversation_settings_change_what_the_model_is_told(engine, seen):
    session = Session(engine)
    _drain(session.submit(Turn("hello")))
    assert seen[-1][0][0]["content"] == engine.config.system_prompt
    engine.store.set_settings(session.id, {"instructions": "Answer like a pirate.", "temperature": 1.3})
    _drain(session.submit(Turn("hello again")))
    messages, params = seen[-1]
    assert messages[0] == {"role": "system", "content": "Answer like a pirate."} and params.temperature == 1.3
    assert engine.store.turns(session.id)[-1].meta["model"] == engine.config.llm.model


def test_a_database_from_before_trees_keeps_its_conversations(tmp_path):
    db = sqlite3.connect(tmp_path / "conversations.sqlite3")
    db.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
                                    updated_at REAL NOT NULL);
        CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL
                            REFERENCES conversations(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL,
                            status TEXT NOT NULL DEFAULT 'complete', meta TEXT NOT NULL DEFAULT '{}',
                            created_at REAL NOT NULL);
        INSERT INTO conversations VALUES ('a', 'A', 1, 1), ('b', 'B', 1, 1);
        INSERT INTO turns (conversation_id, role, content, created_at) VALUES
            ('a', 'user', 'q1', 1), ('b', 'user', 'x1', 1), ('a', 'assistant', 'a1', 1),
            ('a', 'user', 'q2', 1), ('b', 'assistant', 'y1', 1), ('a', 'assistant', 'a2', 1);
    """)
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert [t.content for t in store.turns("a")] == ["q1", "a1", "q2", "a2"]
        assert [t.content for t in store.turns("b")] == ["x1", "y1"]
        assert [t.parent_id for t in store.turns("a")] == [None, 1, 3, 4]
        store.add_turn("a", "user", "q3")
        assert store.turns("a")[-1].parent_id == 6 and store.settings("a") == {}
    finally:
        store.close()
    store = Store(tmp_path)  # opened again: migrated once, nothing changed
    try:
        assert [t.content for t in store.turns("a")] == ["q1", "a1", "q2", "a2", "q3"]
    finally:
        store.close()


def test_a_model_no_longer_installed_is_a_clear_error(engine):
    session = Session(engine)
    _drain(session.submit(Turn("hello")))
    engine.store.set_settings(session.id, {"model": "gone-model"})
    events = list(session.submit(Turn("hello again")))
    errors = [e.message for e in events if isinstance(e, Error)]
    assert errors and "no language model 'gone-model'" in errors[0] and isinstance(events[-1], Done)
    # (another installed model answering, named on its answer: tests/test_browser_chat.py)


def test_stop_while_an_attachment_is_looked_at_stores_nothing_and_raises_nothing(engine, png):
    from engine.events import CancelToken, Notice

    assert engine.perceiver.enabled
    cancel = CancelToken()
    cancel.cancel("stopped by the user")
    session = Session(engine)
    events = list(session.submit(Turn("what is in this picture?", (str(png),)), cancel))
    assert any(isinstance(e, Notice) and "nothing was stored" in e.message for e in events)
    assert isinstance(events[-1], Done) and not events[-1].turn_id
    assert engine.store.list_conversations() == []
