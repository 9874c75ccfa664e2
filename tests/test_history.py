"""What the model reads of the conversation, and that what it keeps between turns
(the KV cache) never changes an answer.

A stopped answer and a tool turn are the two turns whose stored text is not a plain
reply: the next answer must equal what a fresh engine answers from the stored history,
a tool's reply must not read as a sentence to imitate, and a stopped answer must read
as stopped, not as something to go on with."""
from __future__ import annotations

import pytest

from engine.config import load_config
from engine.engine import Engine
from engine.events import CancelToken, Done, TextDelta
from engine.session import Session, Turn


def _say(session, text, attachments=(), stop_after=None, **kw):
    """Submit a turn; with `stop_after`, press Stop after that many text deltas."""
    cancel, parts = CancelToken(), []
    for ev in session.submit(Turn(text, attachments, **kw), cancel):
        if isinstance(ev, TextDelta):
            parts.append(ev.text)
            if stop_after and len(parts) == stop_after:
                cancel.cancel()
        if isinstance(ev, Done):
            done = ev
    return "".join(parts), done


def _script(session, clip):
    """A story stopped half-way, a question, a tool turn (trim a video), thanks."""
    story, done = _say(session, "Tell me a story about a lighthouse keeper.", stop_after=6, max_new_tokens=40)
    assert done.interrupted and story
    _say(session, "What is 2 + 2?")
    _, done = _say(session, "Trim clip.mp4 to the first 1 second", (str(clip),))
    tool = session.engine.store.turns(session.id)[-1]
    assert "tool" in tool.meta and tool.status == "complete" and tool.media
    _say(session, "thanks!")


def _fresh_answers(config, cid):
    """Every chat answer of conversation `cid`, answered again by a new engine (nothing
    kept from any earlier turn) from the stored history before it; with the stored one."""
    fresh = Engine(config)
    try:
        session = Session(fresh, cid)
        pairs = []
        for turn in fresh.store.turns(cid):
            if turn.role != "assistant" or "tool" in turn.meta or turn.status != "complete":
                continue
            messages = [{"role": "system", "content": config.system_prompt}, *session.history(turn.parent_id)]
            fresh.llm().forget()
            text, _, _ = _drain(fresh.answer(messages, fresh.params(), CancelToken()))
            pairs.append((turn.content, text))
        return pairs
    finally:
        fresh.close()


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_answers_after_a_stopped_and_a_tool_turn_equal_a_fresh_engines(engine, mp4):
    """Greedy on the tiny model: the answers given with the kept KV cache (after a stopped
    story and after a trim) are the answers of a new engine from the stored history."""
    session = Session(engine)
    _script(session, mp4)
    pairs = _fresh_answers(engine.config, session.id)
    assert len(pairs) == 2  # "What is 2 + 2?" after the stopped story, "thanks!" after the trim
    for kept, fresh in pairs:
        assert kept == fresh and kept


def test_a_tool_turn_reads_as_a_note_not_as_a_reply_to_imitate(engine, mp4):
    session = Session(engine)
    _say(session, "Trim clip.mp4 to the first 1 second", (str(mp4),))
    stored = engine.store.turns(session.id)[-1]
    assert stored.content.startswith("Here is the video, made with")  # what the user was shown, kept as is
    seen = session.history()[-1]
    assert seen == {"role": "assistant", "content": "[video made: trim of clip.mp4]"}


def test_notes_for_tool_turns_name_what_was_made_from_what():
    from engine.context import tool_note

    assert tool_note({"name": "edit_video", "arguments": {"operation": "speed", "video": "clip.mp4", "factor": 2}},
                     ["video"], "complete") == "[video made: speed of clip.mp4]"
    assert tool_note({"name": "generate_image", "arguments": {"prompt": "a red fox in the snow"}},
                     ["image"], "complete") == "[image made: a red fox in the snow]"
    assert tool_note({"name": "edit_image", "arguments": {"instruction": "crop it to a square", "image": "b.png"}},
                     ["image"], "complete") == "[image made: crop it to a square (from b.png)]"
    assert tool_note({"name": "edit_video", "arguments": {"operation": "extract_frames", "video": "c.mp4"}},
                     ["image", "image"], "complete") == "[2 images made: extract frames of c.mp4]"
    assert tool_note({"name": "generate_video", "arguments": {"prompt": "waves " * 40}}, [], "interrupted") \
        .startswith("[generate video stopped, nothing made: waves waves")
    assert len(tool_note({"name": "generate_3d", "arguments": {"prompt": "x" * 500}}, ["model3d"], "complete")) < 120


def test_a_stopped_answer_is_kept_marked_and_closed(engine):
    session = Session(engine)
    partial, done = _say(session, "Tell me a story", stop_after=4, max_new_tokens=40)
    assert done.interrupted and partial
    assert engine.store.turns(session.id)[-1].content == partial  # stored as it was shown
    seen = session.history()[-1]
    assert seen["role"] == "assistant" and seen["content"].startswith(partial)
    assert seen["content"] != partial and "interrupted" in seen["content"]
    # the next prompt closes the stopped answer's turn before the new question
    llm = engine.llm()
    prompt = llm.tokenizer.apply_chat_template([*session.history(), {"role": "user", "content": "go on"}],
                                               tokenize=False, add_generation_prompt=True)
    assert seen["content"] + "<|im_end|>" in prompt


def test_history_before_a_turn_leaves_it_and_later_turns_out(engine):
    session = Session(engine)
    _say(session, "first")
    _say(session, "second")
    turns = engine.store.turns(session.id)
    assert [m["content"] for m in session.history(turns[1].id)] == ["first", turns[1].content]
    assert len(session.history()) == 4


@pytest.fixture
def still_clip(tmp_path):
    """clip.mp4 as the `mp4` fixture makes it (2 s, 64x48, 10 fps) but one steady scene: its facts
    in the history are ~40 tokens instead of the ~300 of seven scenes (the tiny model's test keeps
    those: there they make the history outgrow its 256-token context), which the real model would
    otherwise prefill twice (the kept engine's answer after the trim, the fresh one's) at ~60 tokens/s,
    besides OCR on six more keyframes."""
    import cv2
    import numpy as np

    (tmp_path / "still").mkdir()
    path = tmp_path / "still" / "clip.mp4"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for _ in range(20):
        out.write(np.full((48, 64, 3), 90, np.uint8))
    out.release()
    return path


@pytest.mark.slow
def test_real_model_answers_the_same_with_and_without_the_kept_cache(tmp_path, still_clip, cpu_model_cache):
    """The same on the cpu profile's model (greedy): the answers after a stopped story and after a
    tool turn are what a fresh engine answers, and "What is 2 + 2?" is answered, not
    the story continued. (The model's cache, made by the session's first start, is copied in:
    the KV cache kept between turns is what is under test, not the model's first load.)"""
    from tests.conftest import seed_models

    data = seed_models(cpu_model_cache, tmp_path)
    config = load_config("cpu", overrides={"data_dir": str(data), "temperature": "0", "max_new_tokens": "40"}, env={})
    eng = Engine(config)
    try:
        session = Session(eng)
        _script(session, still_clip)
        turns = eng.store.turns(session.id)
        four = next(t.content for t in turns if t.role == "assistant" and t.status == "complete")
        assert "4" in four
        pairs = _fresh_answers(config, session.id)
    finally:
        eng.close()
    assert len(pairs) == 2 and all(kept == fresh for kept, fresh in pairs)
