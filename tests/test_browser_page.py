"""The page as a person meets it (issue 24): answers with code, tables and math; pasting and
dropping files; the keys; dark mode; the phone layout; and axe-core finding nothing serious.

One server whose answers never end by themselves (so Esc can stop one mid-stream), one browser
and one page for the whole module."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.ui_page import math_markup
from tests.test_browser import ARGS, CHROMIUM

AXE = Path(__file__).resolve().parents[1] / ".cache/axe/node_modules/axe-core/axe.min.js"
no_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="Debian chromium not installed (make browser)")


def browser_test(test):
    return pytest.mark.browser(no_chromium(test))


ANSWER = r"""Here is a Python function:

```python
def area(r: float) -> float:
    return 3.14159 * r ** 2
```

| Shape  | Formula   | Area at r=2 |
|--------|-----------|-------------|
| circle | $\pi r^2$ | 12.57       |
| square | $s^2$     | 4           |

The roots are $x = \frac{-b \pm \sqrt{b^2-4ac}}{2a}$, and

$$e^{i\pi} + 1 = 0$$

It costs $5 and $10, or $5-$10 in all."""
# a 64x48 red PNG made in the page, pasted into the message box or dropped onto it
FILE_IN = """async ([name, how]) => {
  const canvas = Object.assign(document.createElement('canvas'), {width: 64, height: 48});
  const g = canvas.getContext('2d'); g.fillStyle = '#c83232'; g.fillRect(0, 0, 64, 48);
  const blob = await new Promise(done => canvas.toBlob(done, 'image/png'));
  const files = new DataTransfer(); files.items.add(new File([blob], name, {type: 'image/png'}));
  const box = document.querySelector('#input textarea');
  const event = {bubbles: true, cancelable: true};
  if (how === 'paste') box.dispatchEvent(new ClipboardEvent('paste', {clipboardData: files, ...event}));
  else for (const type of ['dragenter', 'dragover', 'drop'])
    box.dispatchEvent(new DragEvent(type, {dataTransfer: files, ...event}));
}"""


def test_inline_math_is_marked_and_prices_are_not():
    assert math_markup(r"roots $x = \frac{-b}{2a}$, ok") == r"roots \(x = \frac{-b}{2a}\), ok"
    assert math_markup(r"| $\pi r^2$ | 12 |") == r"| \(\pi r^2\) | 12 |"
    for plain in ("it costs $5 and $10", "$5-$10", "$5.99/$6.99", "US$5 and US$10", "$ x $", "$x$5",
                  "pay $5\nor $6", "`$HOME` and `$PATH`", "```sh\necho $a$\n```", "$$e^{i\\pi}$$", r"\(a\)"):
        assert math_markup(plain) == plain, plain
    assert math_markup("```sh\necho $a$\n```\nthen $y$") == "```sh\necho $a$\n```\nthen \\(y\\)"
    assert math_markup("$$a$$ and $b$") == "$$a$$ and \\(b\\)"
    huge = "$a$ " * 60_000
    assert math_markup(huge) is huge  # past the bound: shown as it is, no regex over it


@pytest.fixture(scope="module")
def page(long_server):
    from playwright.sync_api import sync_playwright

    store = long_server.engine.store
    cid = store.create_conversation("Markdown demo")
    store.add_turn(cid, "user", "A function, a table and some math, please.")
    store.add_turn(cid, "assistant", ANSWER)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=long_server.url)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        _open(page, long_server.url)
        yield page
        browser.close()


def _open(page, url: str) -> None:
    page.goto(url + "/", wait_until="load")
    page.locator("#conversations label").first.wait_for(timeout=30_000)  # filled by demo.load


def _open_demo(page) -> None:
    if page.locator(".sidebar.open").count() == 0:
        page.locator(".sidebar .toggle-button").click()
    page.locator("#conversations label").filter(has_text="Markdown demo").click()
    page.locator("#chat table").first.wait_for(timeout=30_000)
    page.locator("#chat .katex").nth(3).wait_for(timeout=30_000)


def _axe(page) -> list[str]:
    """What axe-core finds serious or critical on the page as it is now."""
    if not page.evaluate("() => !!window.axe"):
        page.add_script_tag(path=str(AXE))
    return page.evaluate("""async () => {
        await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));  // page.js's pass
        return (await axe.run(document, {resultTypes: ['violations']})).violations
        .filter(v => v.impact === 'serious' || v.impact === 'critical')
        .map(v => `${v.id}: ${v.nodes.map(n => n.target.join(' ')).slice(0, 5).join(', ')}`); }""")


@browser_test
def test_an_answer_shows_highlighted_code_a_table_and_math(page, tmp_path):
    _open_demo(page)
    chat = page.locator("#chat")
    code = chat.locator("pre code").first
    assert code.locator(".token.keyword").count() >= 2  # highlighted (def, return)
    assert [c.inner_text().strip() for c in chat.locator("table tr").nth(1).locator("td").all()][0] == "circle"
    assert chat.locator("table .katex").count() == 2  # pi r^2 and s^2, inside the table
    assert chat.locator(".katex-display").count() == 1 and chat.locator(".katex").count() == 4
    text = chat.inner_text()
    assert "It costs $5 and $10, or $5-$10 in all." in text  # prices are not math
    assert "\\frac" not in text and "$s^2$" not in text
    code.locator("xpath=ancestor::div[contains(@class, 'code_wrap')]").locator("button").first.click()
    assert "return 3.14159 * r ** 2" in page.evaluate("() => navigator.clipboard.readText()")
    chat.locator(".message-buttons-left button[aria-label='Copy message']").last.click()  # the whole answer
    page.wait_for_function("() => navigator.clipboard.readText().then(t => t.includes('It costs'))", timeout=30_000)
    assert page.evaluate("() => navigator.clipboard.readText()").strip() == ANSWER  # its own `$x$`, not `\\(x\\)`
    page.screenshot(path=str(tmp_path / "answer-desktop.png"))
    assert not page.errors, page.errors


@browser_test
def test_nothing_serious_for_axe_in_light_dark_and_on_a_phone(page, long_server, tmp_path):
    if not AXE.is_file():
        pytest.skip("axe-core not installed (make browser)")
    _open_demo(page)
    for panel in ("#media-panel", "#perception-panel", "#router-panel", "#voice-settings", "#status-panel"):
        page.locator(panel).locator("button").first.click()
    page.locator("#status table, #status p").first.wait_for(timeout=30_000)
    assert _axe(page) == []
    page.screenshot(path=str(tmp_path / "desktop-light.png"), full_page=True)
    page.locator("#new-chat").click()
    page.locator("#rename").click()  # nothing open: a warning toast
    page.locator(".toast-body .toast-header:not([role])").first.wait_for(timeout=30_000)  # (page.js has been)
    assert _axe(page) == []
    page.locator(".toast-close").first.click()

    page.emulate_media(color_scheme="dark")
    page.set_viewport_size({"width": 390, "height": 844})
    _open(page, long_server.url)
    page.wait_for_function("() => document.body.classList.contains('dark')", timeout=30_000)  # follows the system
    _open_demo(page)  # (the sidebar closes itself after the pick on a phone)
    page.wait_for_function("() => !document.querySelector('.sidebar.open')", timeout=30_000)
    assert _axe(page) == []
    table = page.locator("#chat table").first.bounding_box()
    bubble = page.locator("#chat .bot-row").last.bounding_box()
    assert table["x"] + table["width"] <= bubble["x"] + bubble["width"] + 1  # scrolls inside, never spills out
    page.screenshot(path=str(tmp_path / "phone-dark.png"))
    page.locator(".sidebar .toggle-button").click()
    page.locator(".sidebar.open").wait_for(timeout=30_000)
    assert _axe(page) == []
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 1280, "height": 800})
    _open(page, long_server.url)
    assert not page.errors, page.errors


@browser_test
def test_paste_drop_enter_shift_enter_esc_and_new_chat_keys(page, long_server):
    store = long_server.engine.store
    assert "Ctrl+Shift+O" in page.locator("#new-chat").get_attribute("title")
    assert "Esc" in page.locator("#stop").get_attribute("title")
    assert "Ctrl+Shift+O" in page.locator("#shortcuts").inner_text()
    page.keyboard.press("Control+Shift+O")
    box = page.locator("#input textarea")
    for n, (name, how) in enumerate((("pasted.png", "paste"), ("dropped.png", "drop")), start=1):
        page.evaluate(FILE_IN, [name, how])
        page.locator("#input img").first.wait_for(timeout=30_000)  # attached, shown in the box
        if n == 1 and AXE.is_file():
            assert _axe(page) == []  # (the box with a file in it)
        box.fill(f"What colour is {name}?")
        box.press("Shift+Enter")  # a new line, not a send
        box.type("Answer in one word.")
        assert box.input_value() == f"What colour is {name}?\nAnswer in one word."
        box.press("Enter")
        page.wait_for_function(f"() => document.querySelectorAll('#chat .user-row img').length === {n}",
                               timeout=30_000)
        # the answer streams (past "looked at ..."), then Esc stops it
        page.wait_for_function("""() => { const b = document.querySelectorAll('#chat .bot-row .md');
            const t = b.length ? b[b.length - 1].innerText.trim() : ''; return t && !t.includes('looked at'); }""",
                               timeout=60_000)
        page.keyboard.press("Escape")
        page.wait_for_function(f"() => document.querySelector('#chat').innerText.split('(interrupted)').length > {n}",
                               timeout=30_000)  # (drawn from the store once the turn is saved)
    cid = next(c["id"] for c in store.list_conversations() if c["title"] != "Markdown demo")
    turns = store.turns(cid)
    assert [(t.role, t.status, [m.kind for m in t.media]) for t in turns] == [
        ("user", "complete", ["image"]), ("assistant", "interrupted", []),
        ("user", "complete", ["image"]), ("assistant", "interrupted", [])]
    assert turns[2].content == "What colour is dropped.png?\nAnswer in one word."
    if AXE.is_file():  # pictures in the chat, stopped answers, the line under them
        assert _axe(page) == []

    page.locator("#input textarea").blur()
    page.keyboard.press("Control+Shift+O")  # a new chat: nothing open, the box focused
    page.wait_for_function("() => !document.querySelector('#chat .user-row') "
                           "&& !document.querySelector('#conversations input:checked')", timeout=30_000)
    assert page.evaluate("() => document.activeElement === document.querySelector('#input textarea')")
    assert not page.errors, page.errors
