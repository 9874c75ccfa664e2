"""The chat's everyday controls in a real browser: answer again and switch back, edit a sent
message (the model reads the new branch only), per-conversation instructions and model, and all
of it kept across a server restart."""
from __future__ import annotations

import shutil

import pytest

from tests.test_browser import ARGS, CHROMIUM
from tests.test_browser_page import AXE, _axe

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make browser)")]


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _send(page, text: str, answers: int) -> None:
    box = page.locator("#input textarea")
    box.fill(text)
    box.press("Enter")
    _settled(page, answers)


def _settled(page, answers: int) -> None:
    """Wait for `answers` finished answers (each closes with its model's name) and no pending one."""
    page.wait_for_function(f"() => document.querySelectorAll('#chat .bot .turn-meta').length >= {answers} "
                           "&& !document.querySelector('#chat .pending')", timeout=60_000)


def _last_answer(page) -> str:
    """The last answer's own words (without its closing line)."""
    return page.evaluate("() => { const b = [...document.querySelectorAll('#chat .bot')].pop().cloneNode(true); "
                         "b.querySelectorAll('.turn-meta').forEach(m => m.remove()); return b.innerText.trim(); }")


def _metas(page) -> list[str]:
    return [" ".join(t.split()) for t in page.locator("#chat .turn-meta").all_inner_texts()]


def test_regenerate_edit_settings_and_restart(chromium, tmp_path, prompts):
    from tests.conftest import running_server

    data = tmp_path / "data"
    with running_server(data, max_new_tokens="16", context_tokens="4096") as srv:
        asked = prompts(srv.engine)
        page = chromium.new_page(viewport={"width": 1280, "height": 800})
        page.goto(srv.url + "/", wait_until="load")
        page.locator("#input textarea").wait_for(timeout=30_000)
        _send(page, "my name is Ada", 1)
        _send(page, "what is my name?", 2)
        first = _last_answer(page)

        # answer again: "2/2", the same question and history asked again, then back to the first
        page.locator("#chat button[aria-label=Retry]").last.click()
        page.get_by_text("2/2").first.wait_for(timeout=60_000)
        _settled(page, 2)
        assert asked[-1][0] == asked[-2][0]
        assert _metas(page)[-1].endswith("answer 2/2 ›")
        page.locator("#chat .bot .turn-meta a.branch").last.click()  # ‹ previous answer
        page.get_by_text("1/2").first.wait_for(timeout=30_000)
        assert _last_answer(page) == first

        # edit the first message: the model is asked with it alone, the old branch is kept
        page.locator("#chat button[aria-label=Edit]").first.click()
        page.locator("#chat textarea").first.fill("my name is Grace")
        page.locator("#chat button[aria-label=Submit]").first.click()
        page.wait_for_function("() => document.querySelectorAll('#chat .bot').length === 1 "
                               "&& document.querySelectorAll('#chat .turn-meta').length === 2", timeout=60_000)
        assert [m["content"] for m in asked[-1][0][1:]] == ["my name is Grace"]
        assert "version 2/2" in _metas(page)[0]
        _send(page, "and my name?", 2)
        assert "Ada" not in str(asked[-1][0]) and "my name is Grace" in str(asked[-1][0])

        # this conversation's instructions and model
        page.locator("#chat-settings").get_by_text("This conversation").click()
        page.locator("#instructions textarea").fill("You are a pirate. Say arr.")
        page.locator("#model-pick input").click()
        page.get_by_role("option", name="SmolLM2-135M-Instruct").click()
        page.locator("#settings-save").click()
        page.get_by_text("now answers with SmolLM2-135M-Instruct").first.wait_for(timeout=30_000)
        _send(page, "hello", 3)
        messages, params = asked[-1]
        assert messages[0] == {"role": "system", "content": "You are a pirate. Say arr."}
        assert params.model == "smollm2-135m" and srv.engine.llm_state("smollm2-135m")[0] == "ready"
        assert _metas(page)[-1].startswith("SmolLM2-135M-Instruct")
        if AXE.is_file():  # the "‹ ›" links and the settings panel: nothing serious for axe-core
            assert _axe(page) == []
        shot = tmp_path / "branches.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        page.close()

    # a restart keeps the branches, the settings and who wrote what
    with running_server(data, max_new_tokens="16", context_tokens="4096") as srv:
        page = chromium.new_page(viewport={"width": 1280, "height": 800})
        page.goto(srv.url + "/", wait_until="load")
        page.locator("#conversations").get_by_text("my name is Ada").click()
        _settled(page, 3)
        metas = _metas(page)
        assert "version 2/2" in metas[0] and metas[-1].startswith("SmolLM2-135M-Instruct")
        page.locator("#chat-settings").get_by_text("This conversation").click()
        assert page.locator("#instructions textarea").input_value() == "You are a pirate. Say arr."
        page.locator("#chat .turn-meta a.branch").first.click()  # back to the first version of the first message
        page.get_by_text("my name is Ada").last.wait_for(timeout=30_000)
        page.wait_for_function("() => document.querySelector('#chat').innerText.includes('what is my name?')",
                               timeout=30_000)
        page.close()
