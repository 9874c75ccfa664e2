from engine.context import CUT_MARK, fit


def count(msgs):  # one token per character, plus 2 per message
    return sum(len(m["content"]) + 2 for m in msgs)


SYS = {"role": "system", "content": "sys"}


def test_fits_untouched():
    msgs = [SYS, {"role": "user", "content": "hi"}]
    out = fit(msgs, count, 100)
    assert out.messages == msgs and not out.dropped and not out.truncated_chars and out.notice(100) == ""


def test_drops_oldest_turns_keeps_system_and_never_starts_on_assistant():
    msgs = [SYS] + [{"role": r, "content": f"{r}{i}" * 5} for i in range(4) for r in ("user", "assistant")]
    msgs.append({"role": "user", "content": "last"})
    out = fit(msgs, count, 60)
    assert out.messages[0] == SYS and out.messages[-1]["content"] == "last"
    assert out.messages[1]["role"] == "user" and count(out.messages) <= 60
    assert out.dropped > 0 and "oldest" in out.notice(60)


def test_newest_message_too_long_keeps_its_tail():
    msgs = [SYS, {"role": "user", "content": "a" * 500 + "QUESTION"}]
    out = fit(msgs, count, 100)
    kept = out.messages[-1]["content"]
    assert kept.startswith(CUT_MARK) and kept.endswith("QUESTION") and count(out.messages) <= 100
    assert out.truncated_chars == 508 - (len(kept) - len(CUT_MARK))


def test_system_prompt_larger_than_context_is_dropped():
    msgs = [{"role": "system", "content": "s" * 500}, {"role": "user", "content": "hi"}]
    out = fit(msgs, count, 50)
    assert out.messages == [{"role": "user", "content": "hi"}] and out.dropped == 1
