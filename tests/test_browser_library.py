"""The sidebar's search, export and import in a real browser (Debian chromium via playwright)."""
from __future__ import annotations

import json
import zipfile

import pytest

from engine.media import ingest
from tests.test_browser import browser, playwright, pytestmark  # noqa: F401 - the same browser fixtures and marks


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app without its models loaded: nothing here asks the model anything."""
    from app.server import Server
    from engine.config import load_config
    from engine.engine import Engine
    from tests.conftest import free_port

    fields = {"data_dir": str(tmp_path_factory.mktemp("library")), "port": str(free_port())}
    engine = Engine(load_config("tiny", overrides=fields, env={}))
    srv = Server(engine).start()
    yield srv
    srv.close()
    engine.close()


@pytest.fixture(scope="module")
def library(server, tmp_path_factory):
    """Three stored conversations (written to the store directly: no model needed): one whose
    old answer holds a rare word, one with a photo, one plain."""
    from PIL import Image

    store = server.engine.store
    photo = tmp_path_factory.mktemp("photos") / "harbour.png"
    Image.new("RGB", (320, 200), (30, 120, 200)).save(photo)
    sailing = store.create_conversation("Sailing notes")
    store.add_turn(sailing, "user", "Tell me about the old lighthouse.")
    store.add_turn(sailing, "assistant", "Its keeper polished the brass lantern every evening.")
    winter = store.add_turn(sailing, "user", "And in winter?")
    storms = store.add_turn(sailing, "assistant", "Storms kept him inside.")
    store.add_turn(sailing, "assistant", "Foghorns sounded all night.", parent=winter)  # a regenerated answer
    store.show(sailing, storms)  # ... not the one shown
    pictured = store.create_conversation("Harbour picture")
    rec = ingest(photo, store.media_dir, 10**7, "harbour.png")
    store.add_turn(pictured, "user", "What colour is the water here?", media=(rec,))
    store.add_turn(pictured, "assistant", "A calm blue.")
    store.create_conversation("Recipes")
    store.add_turn(store.list_conversations()[0]["id"], "user", "How long to boil pasta?")
    return {"sailing": sailing, "pictured": pictured, "photo": photo}


@pytest.fixture(scope="module")
def page(browser, server, library):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(server.url + "/", wait_until="load")
    page.locator("#conversations label").first.wait_for(timeout=30_000)
    yield page
    page.close()


def _search_box(page):
    return page.locator("#search textarea, #search input").first


def _toast(page, text: str) -> str:
    toast = page.locator(".toast-body").filter(has_text=text).first
    toast.wait_for(timeout=30_000)
    said = toast.inner_text()
    page.locator(".toast-close").first.click()
    return said


def _answered(page, query: str) -> None:
    """Wait for the results of `query` (those of the letters typed before it may show first)."""
    page.wait_for_function("q => [...document.querySelectorAll('#search-results [data-query]')]"
                           ".some(e => e.dataset.query === q)", arg=query, timeout=30_000)


def _import(page, path) -> None:
    with page.expect_file_chooser(timeout=30_000) as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(path))


def test_search_finds_an_old_answer_and_opens_it(page, library, tmp_path):
    box = _search_box(page)
    assert page.get_by_label("Search conversations").count() == 1  # labelled
    box.click()
    box.press_sequentially("lante")  # a prefix of a word only in an old answer
    _answered(page, "lante")
    hit = page.locator("#search-results .search-hit")
    assert hit.count() == 1 and "Sailing notes" in hit.first.inner_text()
    assert page.locator("#search-results mark").first.inner_text().lower() == "lantern"
    assert not page.locator("#conversations").is_visible()  # the results stand in for the list
    page.screenshot(path=str(tmp_path / "search-results.png"))
    hit.first.focus()
    page.keyboard.press("Enter")  # keyboard: a focused result opens with Enter
    page.locator("#chat").get_by_text("brass lantern").first.wait_for(timeout=30_000)
    assert page.locator("#title textarea, #title input").first.input_value() == "Sailing notes"
    page.screenshot(path=str(tmp_path / "search-opened.png"))

    box.fill("")
    box.press_sequentially("foghorn")  # in an answer on the branch not shown: opened on that branch
    _answered(page, "foghorn")
    page.locator("#search-results .search-hit").first.click()
    page.locator("#chat").get_by_text("Foghorns sounded all night.").first.wait_for(timeout=30_000)
    assert page.locator("#chat").get_by_text("Storms kept him inside.").count() == 0

    box.fill("")
    box.press_sequentially("recipes")
    _answered(page, "recipes")
    assert "Recipes" in page.locator("#search-results .search-hit").first.inner_text()
    box.press("Enter")  # Enter in the box opens the first result
    page.locator("#chat").get_by_text("boil pasta").first.wait_for(timeout=30_000)

    box.fill("")
    box.press_sequentially('zebra" AND (')  # FTS syntax is just text: nothing found, no error
    _answered(page, 'zebra" AND (')
    assert "No conversation matches" in page.locator("#search-results").inner_text()
    box.fill("")
    box.press("Backspace")  # cleared: the full list again
    page.locator("#conversations").wait_for(state="visible", timeout=30_000)
    assert page.locator("#conversations label").count() == 3
    assert not page.locator("#search-results").is_visible()
    assert not page.errors, page.errors


def test_export_json_and_import_it_back_with_its_image(page, server, library, tmp_path):
    store = server.engine.store
    page.locator("#conversations label").filter(has_text="Harbour picture").click()
    page.locator("#chat img").first.wait_for(timeout=30_000)
    with page.expect_download(timeout=30_000) as download:
        page.locator("#export-json").click()  # one click, one download
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    assert exported.name == "Harbour picture.json"
    doc = json.loads(exported.read_text())
    assert [m["name"] for m in doc["media"]] == ["harbour.png"]

    with page.expect_download(timeout=30_000) as download:
        page.locator("#export-md").click()
    md = tmp_path / "harbour.zip"
    download.value.save_as(md)
    with zipfile.ZipFile(md) as z:
        assert "![harbour.png](harbour.png)" in z.read("conversation.md").decode()
        assert z.read("harbour.png") == library["photo"].read_bytes()

    before = len(store.list_conversations())
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps({**doc, "turns": [{**doc["turns"][0], "parent": 12345}]}))
    _import(page, bad)
    assert "parent" in _toast(page, "Not imported")
    assert len(store.list_conversations()) == before

    _import(page, exported)
    _toast(page, "Imported")
    page.wait_for_function("() => [...document.querySelectorAll('#conversations label')]"
                           ".filter(l => l.innerText.includes('Harbour picture')).length === 2", timeout=30_000)
    new = store.list_conversations()[0]
    assert new["id"] != library["pictured"] and new["title"] == "Harbour picture"
    assert page.locator("#conversations input:checked").first.input_value() == new["id"]  # opened
    page.locator("#chat").get_by_text("A calm blue.").first.wait_for(timeout=30_000)
    page.locator("#chat img").first.wait_for(timeout=30_000)  # the image is in its chat
    (turn, _) = store.turns(new["id"])
    assert turn.media[0].sha256 == store.turns(library["pictured"])[0].media[0].sha256
    page.screenshot(path=str(tmp_path / "imported.png"))
    assert not page.errors, page.errors
