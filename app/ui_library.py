"""The sidebar's library: search the conversations, export the open one, import one.

Thin wiring over engine/search.py and engine/transfer.py. `Library` builds its controls
where app/ui.py places them (the search box above the conversation list, the export and
import buttons below it) and wires them to the page's own way of opening a conversation,
so a search result or an imported conversation opens exactly like a pick from the list.

Search: typing filters (the results replace the list while the box has text; clearing it
brings the list back); Enter opens the first result, a click (or Enter on a focused result
button) opens that one, on the branch where the match is. Export gives a download (the
link also stays in the sidebar); Import takes a JSON export, and a bad file is a warning
that says what is wrong, with nothing added.
"""
from __future__ import annotations

import atexit
import html
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import gradio as gr

from engine.errors import InputError, Unavailable
from engine.search import search
from engine.transfer import export_json, export_markdown, import_json

RESULTS = 30
KEEP_EXPORTS_S = 600  # an export's file waits this long for its download (Gradio copies it at once)
# a click (or Enter/Space on a focused button) on a result: its "cid:turn" as the select event's value
PICK_JS = """
element.addEventListener('click', (event) => {
  const hit = event.target.closest('[data-pick]');
  if (hit) trigger('select', { index: Number(hit.dataset.index), value: hit.dataset.pick });
});
"""
# the results' look (scoped to the results by Gradio): one button a line, matches highlighted
RESULTS_CSS = """
.search-hits { list-style: none; margin: 0; padding: 0; }
.search-hit { display: block; width: 100%; text-align: left; margin: 4px 0; padding: 6px 8px; cursor: pointer;
  border: 1px solid var(--border-color-primary); border-radius: 6px; background: var(--background-fill-primary);
  color: var(--body-text-color); font: inherit; font-size: var(--text-md); }
.search-hit:hover, .search-hit:focus-visible { background: var(--background-fill-secondary);
  outline: 2px solid var(--color-accent); }
.hit-title { display: block; font-weight: 600; }
.hit-snippet { display: block; font-size: 0.85em; opacity: 0.85; overflow-wrap: anywhere; }
mark { background: #fde047; color: #111; border-radius: 2px; padding: 0 1px; }
.search-count, .search-none { font-size: 0.85em; opacity: 0.8; margin: 2px 0; }
"""
# once the new export's link is in the sidebar, follow it: one click on Export is one download
DOWNLOAD_JS = """() => {
  const started = Date.now();
  const follow = () => {
    const link = document.querySelector('#export-file a[download]');
    if (link) link.click();
    else if (Date.now() - started < 10000) setTimeout(follow, 100);
  };
  follow();
}"""


def results_html(hits, query: str) -> str:
    """Search hits as a list of buttons: the title and a snippet, matches in <mark> (both
    escaped by engine.search before marking). The list says which query it answers."""
    query = query.strip()
    if not hits:
        body = f'<p class="search-none" role="status">No conversation matches \u201c{html.escape(query)}\u201d.</p>'
    else:
        items = []
        for i, hit in enumerate(hits):
            snippet = f'<span class="hit-snippet">{hit.snippet_html}</span>' if hit.snippet_html else ""
            pick = f"{hit.conversation_id}:{hit.turn_id or ''}"
            items.append(f'<li><button type="button" class="search-hit" data-index="{i}" data-pick="{pick}">'
                         f'<span class="hit-title">{hit.title_html or "New chat"}</span>{snippet}</button></li>')
        found = f"{len(hits)} conversation{'s' if len(hits) != 1 else ''} found"
        body = f'<p class="search-count" role="status">{found}</p>' \
            f'<ul class="search-hits" aria-label="Search results">{"".join(items)}</ul>'
    return f'<div data-query="{html.escape(query, quote=True)}">{body}</div>'


class Library:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._exports: list[tuple[float, str]] = []  # (made at, folder)
        self._lock = threading.Lock()
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for _, f in list(self._exports)])

    # --- controls (built where app/ui.py calls these) ---
    def search_controls(self) -> None:
        self.search = gr.Textbox(label="Search conversations", placeholder="Words from a title or a message",
                                 lines=1, max_lines=1, elem_id="search", container=True)
        self.results = gr.HTML("", visible=False, elem_id="search-results", js_on_load=PICK_JS,
                               css_template=RESULTS_CSS, apply_default_css=False)

    def transfer_controls(self) -> None:
        with gr.Row(elem_id="transfer-row"):
            self.export_md = gr.Button("Export .md", size="sm", elem_id="export-md", min_width=60)
            self.export_json = gr.Button("Export .json", size="sm", elem_id="export-json", min_width=60)
            self.upload = gr.UploadButton("Import .json", file_types=[".json"], file_count="single", size="sm",
                                          elem_id="import", min_width=60, type="filepath")
        self.download = gr.File(label="Exported", visible=False, interactive=False, elem_id="export-file")

    # --- wiring ---
    def wire(self, *, conversations: gr.Radio, cid: gr.State, open_fn: Callable, open_outputs: list,
             after: dict) -> None:
        """`open_fn(cid)` is the page's own handler for a pick from the list, `open_outputs` its
        outputs, `after` the step that redraws the side panels."""
        store = self.engine.store

        def listing(value=None) -> gr.Radio:
            return gr.Radio(choices=[(c["title"] or "New chat", c["id"]) for c in store.list_conversations()],
                            value=value)

        def opened(conversation: str):
            return (listing(conversation), *open_fn(conversation))

        nothing = (gr.skip(),) * (1 + len(open_outputs))

        def find(query: str):
            if not (query or "").strip():
                return gr.HTML(value="", visible=False), gr.Radio(visible=True)
            try:
                hits = search(store, query, RESULTS)
            except Unavailable as exc:
                gr.Warning(str(exc))
                return gr.skip(), gr.skip()
            return gr.HTML(value=results_html(hits, query), visible=True), gr.Radio(visible=False)

        def open_pick(value: str):
            conversation, _, turn = str(value or "").partition(":")
            if store.get_conversation(conversation) is None:
                gr.Warning("This conversation no longer exists (deleted in another tab?): search again.")
                return nothing
            if turn.isdigit() and store.turn(conversation, int(turn)) is not None \
                    and int(turn) not in {t.id for t in store.turns(conversation)}:
                store.show(conversation, int(turn))  # the match is on another branch: show that one
            return opened(conversation)

        def open_hit(evt: gr.SelectData):
            return open_pick(evt.value)

        def open_first(query: str):
            hits = search(store, query, 1) if (query or "").strip() else []
            if not hits:
                gr.Warning("Nothing to open: no conversation matches." if (query or "").strip()
                           else "Type words to look for, then Enter.")
                return nothing
            return open_pick(f"{hits[0].conversation_id}:{hits[0].turn_id or ''}")

        def export(write) -> Callable:
            def run(conversation: str | None):
                if not conversation:
                    gr.Warning("Open a conversation first, then export it.")
                    return gr.skip()
                try:
                    path = write(store, conversation, self._export_folder())
                except InputError as exc:
                    gr.Warning(str(exc))
                    return gr.skip()
                return gr.File(value=str(path), visible=True)
            return run

        def import_file(upload):
            if upload is None:
                return nothing
            path = str(upload)  # (type="filepath": the upload's path on this server)
            try:
                done = import_json(store, path, self.engine.config.max_upload_mb * 1_000_000,
                                   models=self.engine.llm_choices(), name=Path(path).name)
            except InputError as exc:
                gr.Warning(f"Not imported: {exc}")
                return nothing
            title = (store.get_conversation(done.conversation_id) or {}).get("title") or "New chat"
            gr.Info(f"Imported \u201c{title}\u201d: {done.turns} messages, {done.media} media files."
                    + "".join(f" {n}" for n in done.notes))
            return opened(done.conversation_id)

        opens = [conversations, *open_outputs]
        quiet = dict(show_progress="hidden", concurrency_limit=None)
        self.search.change(find, self.search, [self.results, conversations], trigger_mode="always_last", **quiet)
        phone = "window.omniUI && window.omniUI.closeSidebarOnPhone();"  # (a phone's sidebar covers the chat)
        self.search.submit(open_first, self.search, opens, js=f"(q) => {{ {phone} return q; }}", **quiet).then(**after)
        self.results.select(open_hit, None, opens, js=f"() => {{ {phone} }}", **quiet).then(**after)
        hide = dict(fn=lambda: gr.File(value=None, visible=False), outputs=self.download, queue=False)
        for button, write in ((self.export_md, export_markdown), (self.export_json, export_json)):
            button.click(**hide).then(export(write), cid, self.download, **quiet).then(None, js=DOWNLOAD_JS)
        self.upload.upload(import_file, self.upload, opens, **quiet).then(**after)

    def _export_folder(self) -> Path:
        """A fresh folder in the temp dir (where Gradio may serve from) per export; older ones,
        downloaded by now, are removed."""
        now, folder = time.time(), tempfile.mkdtemp(prefix="omni-export-")
        with self._lock:
            old = [e for e in self._exports if now - e[0] > KEEP_EXPORTS_S]
            self._exports = [e for e in self._exports if e not in old] + [(now, folder)]
        for _, stale in old:
            shutil.rmtree(stale, ignore_errors=True)
        return Path(folder)
