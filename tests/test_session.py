"""The turn loop on the tiny model: event order, cancel, storage, media, errors."""
from __future__ import annotations

import threading

from engine.events import CancelToken, Done, Error, Notice, TextDelta
from engine.session import Session, Turn


def collect(events):
    return list(events)


def test_stream_is_text_deltas_then_done(engine):
    events = collect(Session(engine).submit(Turn("Hello there")))
    assert isinstance(events[-1], Done) and not events[-1].interrupted
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas and all(isinstance(e, TextDelta) for e in events[:-1])
    done = events[-1]
    assert done.usage["completion_tokens"] > 0 and done.timings["ttft_ms"] is not None
    turns = engine.store.turns(done.conversation_id)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[1].content == "".join(e.text for e in deltas) and turns[1].status == "complete"


def test_cancel_mid_stream_keeps_partial_answer_marked_interrupted(engine):
    session, cancel = Session(engine), CancelToken()
    seen = []
    for ev in session.submit(Turn("Tell me a story", max_new_tokens=40), cancel):
        seen.append(ev)
        if isinstance(ev, TextDelta) and len(seen) == 4:
            cancel.cancel()
    done = seen[-1]
    assert isinstance(done, Done) and done.interrupted
    assert done.usage["completion_tokens"] <= 5  # within one step of the cancel
    partial = "".join(e.text for e in seen if isinstance(e, TextDelta))
    answer = engine.store.turns(session.id)[-1]
    assert answer.status == "interrupted" and answer.content == partial and partial
    # the next message works and sees the partial answer in its history, marked as stopped
    events = collect(session.submit(Turn("go on")))
    assert isinstance(events[-1], Done) and not events[-1].interrupted
    assert {"role": "assistant", "content": partial + " (interrupted)"} in session.history()


def test_stop_from_another_thread(engine):
    cancel = CancelToken()
    stream = Session(engine).submit(Turn("Hi", max_new_tokens=40), cancel)
    first = next(stream)
    assert isinstance(first, TextDelta)
    t = threading.Thread(target=cancel.cancel)
    t.start()
    t.join()
    rest = list(stream)
    assert rest[-1].interrupted and rest[-1].usage["completion_tokens"] <= 2


def test_history_is_trimmed_to_the_context_with_a_notice(engine):
    session = Session(engine)
    for i in range(6):
        collect(session.submit(Turn(f"message number {i} " + "words " * 10)))
    events = collect(session.submit(Turn("and the last one")))
    notices = [e for e in events if isinstance(e, Notice)]
    assert notices and "oldest message" in notices[0].message
    assert isinstance(events[-1], Done) and not events[-1].interrupted
    assert events[-1].usage["prompt_tokens"] <= engine.llm().context_tokens


def test_huge_prompt_is_cut_not_crashed(engine):
    events = collect(Session(engine).submit(Turn("question? " + "lorem ipsum " * 2000)))
    assert any(isinstance(e, Notice) and "cut the first" in e.message for e in events)
    assert isinstance(events[-1], Done) and events[-1].usage["completion_tokens"] > 0


def test_prompt_over_the_limit_is_rejected_and_nothing_stored(engine):
    text = "x" * (engine.config.max_prompt_chars + 1)
    events = collect(Session(engine).submit(Turn(text)))
    assert isinstance(events[0], Error) and "limit is" in events[0].message
    assert isinstance(events[-1], Done) and events[-1].turn_id == 0
    assert engine.store.list_conversations() == []


def test_empty_message_is_rejected(engine):
    events = collect(Session(engine).submit(Turn("   ")))
    assert isinstance(events[0], Error) and "empty" in events[0].message


def test_media_is_stored_perceived_and_its_facts_kept_for_later_turns(engine, png, wav, mp4):
    from engine.events import Perceived

    session = Session(engine)
    events = collect(session.submit(Turn("What is in these?", (str(png), str(wav), str(mp4)))))
    seen = {e.name: e for e in events if isinstance(e, Perceived)}
    assert set(seen) == {png.name, wav.name, mp4.name}
    assert "64x48" in seen[png.name].facts and png.name in seen[png.name].facts
    user = engine.store.turns(session.id)[0]
    assert [m.kind for m in user.media] == ["image", "audio", "video"]
    assert user.media[0].meta == {"width": 64, "height": 48}
    assert set(user.meta["perception"]) == {png.name, wav.name, mp4.name}
    # the next turn's prompt still carries what was seen
    assert "64x48" in session.history()[0]["content"]


def test_perception_off_says_what_to_set(tmp_path, png):
    from engine.config import load_config
    from engine.engine import Engine

    eng = Engine(load_config("tiny", overrides={"data_dir": str(tmp_path), "perception.backend": "none"}, env={}))
    try:
        events = collect(Session(eng).submit(Turn("What is this?", (str(png),))))
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert "can't read images" in text and "perception.backend=tools" in text
    finally:
        eng.close()


def test_corrupt_attachment_rejects_the_turn_with_a_clear_error(engine, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    events = collect(Session(engine).submit(Turn("look", (str(bad),))))
    assert isinstance(events[0], Error) and "broken.png" in events[0].message
    assert "Traceback" not in events[0].message
    assert engine.store.list_conversations() == []


def test_unavailable_model_is_an_error_event_not_a_crash(tmp_path):
    from engine.config import load_config
    from engine.engine import Engine

    eng = Engine(load_config("cpu", overrides={"llm": "no-such-model", "data_dir": str(tmp_path)}, env={}))
    events = collect(Session(eng).submit(Turn("hi")))
    errors = [e for e in events if isinstance(e, Error)]
    assert errors and "unavailable" in errors[0].message and "--llm" in errors[0].message
    assert eng.llm_state()[0] == "unavailable"
    stored = eng.store.turns(events[-1].conversation_id)
    assert stored[-1].status == "error" and "unavailable" in stored[-1].meta["error"]
    eng.close()


def test_a_turn_with_facts_is_decoded_at_the_facts_temperature(tmp_path, png):
    """Sampled at 0.7, the cpu model quoted a sign's OCR'd "BAKERY OPEN" as "Shibabin": a turn that
    carries perception facts is decoded at llm.facts_temperature (greedy), others as configured."""
    from engine.config import load_config
    from engine.engine import Engine

    cfg = load_config("tiny", overrides={"data_dir": str(tmp_path / "data"), "temperature": "0.7"}, env={})
    eng = Engine(cfg)
    llm, seen = eng.llm(), []
    real = llm.generate

    def spy(messages, media=(), params=None, cancel=None):
        seen.append(params)
        return (yield from real(messages, media, params, cancel))

    llm.generate = spy
    try:
        session = Session(eng)
        collect(session.submit(Turn("What is in this?", (str(png),), max_new_tokens=4)))
        collect(session.submit(Turn("And now?", max_new_tokens=4)))
        collect(session.submit(Turn("Look again", (str(png),), max_new_tokens=4, temperature=0.5)))
    finally:
        eng.close()
    assert [p.temperature for p in seen] == [0.0, 0.7, 0.5]


def test_a_request_that_cannot_be_planned_is_an_error_event_and_an_error_turn(engine, wav):
    """The plan's refusal (a 3D model "of this" sound) is an Error event, not a string taken
    for the answer; the turn is stored as an error with the reason, the sound kept."""
    from engine.events import ToolCall

    s = Session(engine)
    events = collect(s.submit(Turn("turn this into a 3D model", (str(wav),))))
    errors = [e for e in events if isinstance(e, Error)]
    assert len(errors) == 1 and "can't make a 3D model from audio" in errors[0].message
    assert not any(isinstance(e, ToolCall) for e in events)
    assert isinstance(events[-1], Done) and events[-1].turn_id
    user, answer = engine.store.turns(s.id)
    assert answer.status == "error" and answer.meta["error"] == errors[0].message
    assert [m.kind for m in user.media] == ["audio"]
    assert not s.history()[1:]  # (an error turn is not read back to the model)


def test_a_new_chat_reuses_the_system_prompt_primed_at_load(engine, answers):
    """The model role primes the system prompt when it loads (engine/roles.py): the first
    turn of a new chat only computes its own message."""
    seen = answers(engine)
    list(Session(engine).submit(Turn("Hello there", max_new_tokens=4)))
    assert seen and seen[0]["cached_prompt_tokens"] > 16
