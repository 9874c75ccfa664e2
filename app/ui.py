"""The browser UI: Gradio Blocks over the engine.

Thin by design: it turns clicks into `Session.submit` calls and events into
chat updates. Model work goes through one queue (concurrency_id "model");
a turn runs on a thread of its own and the chat is redrawn at most once a
frame with what it produced meanwhile, so decoding never waits on the page.
Stop sets the turn's CancelToken, so decoding stops within one token and
the partial answer is stored as interrupted.

Nothing of the store is in the page as built (the page is served before a
login): the conversation list, the status and the panels are filled by
demo.load and by every handler that changes the open conversation. Sidebar
and settings handlers report what went wrong with gr.Warning and leave the
page as it was; they run queued, which is what lets gr.Info/gr.Warning reach
the browser.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from app.panels import NO_PERCEPTION, media_content, named_files, panels, render
from engine.events import CancelToken, Done, Error, MediaResult, Notice, Perceived, Progress, TextDelta, ToolCall
from engine.engine import Engine
from engine.session import Session, Turn
from engine.status import status, status_markdown

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FRAME_S = 0.1  # at most one redraw of a streaming answer per frame
JOIN_S = 10.0  # how long a closed page waits for its cancelled turn to wind down


class ActiveTurns:
    """CancelTokens of running turns, keyed by browser session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}

    def start(self, key: str) -> CancelToken:
        token = CancelToken()
        with self._lock:
            self._tokens[key] = token
        return token

    def stop(self, key: str) -> bool:
        with self._lock:
            token = self._tokens.get(key)
        if token is None:
            return False
        token.cancel("stopped by the user")
        return True

    def finish(self, key: str, token: CancelToken) -> None:
        with self._lock:
            if self._tokens.get(key) is token:
                del self._tokens[key]


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def batched(run: Callable[[], Iterator], cancel: CancelToken, frame_s: float = FRAME_S) -> Iterator[list]:
    """The events of `run()` in order, in lists handed out at most once per `frame_s`.

    `run()` is iterated on a thread of its own: a redraw of the whole chat per token held a
    135M model to a quarter of its speed. The first event of a quiet spell goes out at once
    (the first token is not held back). An exception in the turn is raised here, after the
    events before it. Closed early (the page went away, Gradio closes the handler), the turn
    is cancelled and waited for, boundedly: decoding stops within one token. Only text and
    progress are merged: a batch ends at any other event (a tool starting, a result, an
    error), so each change of state is drawn, however fast the next one follows.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    end = object()

    def more(batch: list) -> bool:
        return isinstance(batch[-1], (TextDelta, Progress))

    def work() -> None:
        try:
            for event in run():
                events.put(event)
        except BaseException as exc:  # (raised again on the handler's thread)
            events.put(_Failed(exc))
        finally:
            events.put(end)

    worker = threading.Thread(target=work, name="ui-turn", daemon=True)
    worker.start()
    finished, due = False, 0.0
    try:
        while not finished:
            batch = [events.get()]
            while more(batch) and (left := due - time.monotonic()) > 0:
                try:
                    batch.append(events.get(timeout=left))
                except queue.Empty:
                    break
            while more(batch) and not events.empty():
                batch.append(events.get())
            finished = batch[-1] is end
            failed = next((b for b in batch if isinstance(b, _Failed)), None)
            batch = [b for b in batch if b is not end and not isinstance(b, _Failed)]
            if batch:
                due = time.monotonic() + frame_s
                yield batch
            if failed is not None:
                raise failed.exc
    finally:
        if not finished:
            cancel.cancel("the page went away")
        worker.join(JOIN_S)


def voice_names() -> list[str]:
    from engine.packaged import names

    return names("tts")


def voice_problem(voice: str) -> str | None:
    """Why `voice` cannot be spoken with (None: it can): a packaged voice name, or the path of a
    Piper .onnx voice with its .onnx.json beside it."""
    voice, voices = (voice or "").strip(), voice_names()
    path = Path(voice).expanduser()
    if voice in voices or (path.suffix == ".onnx" and path.is_file() and Path(f"{path}.json").is_file()):
        return None
    return (f"There is no voice \u201c{voice}\u201d. The voices here: {', '.join(voices) or 'none installed'}; "
            "or give the path of a Piper .onnx voice (with its .onnx.json beside it).")


def conversation_choices(engine: Engine) -> list[tuple[str, str]]:
    return [(c["title"] or "New chat", c["id"]) for c in engine.store.list_conversations()]


def turn_footer(done: Done, notices=()) -> str:
    """The line under an answer: the notices, then tokens and speed when tokens were decoded
    (a media reply decodes none: it says what it made in its text)."""
    n, t = done.usage.get("completion_tokens", 0), done.timings
    bits = [f"{n} tokens"] if n else []
    if n and t.get("decode_tok_s"):
        bits.append(f"{t['decode_tok_s']:.1f} tok/s")
    if n and t.get("ttft_ms") is not None:
        bits.append(f"first token {t['ttft_ms']:.0f} ms")
    if done.interrupted:
        bits.append("stopped")
    return " ".join([*notices, *(["<small>" + " · ".join(bits) + "</small>"] if bits else [])])


def build_ui(engine: Engine) -> gr.Blocks:
    active = ActiveTurns()

    def respond(message: dict, cid: str | None, request: gr.Request):
        message = message or {"text": "", "files": []}
        text, files = message.get("text") or "", list(message.get("files") or [])
        paths = [f if isinstance(f, str) else f.get("path") for f in files]
        shown = render(engine, cid)
        shown += [{"role": "user", "content": {"path": p}} for p in paths]
        if text.strip():
            shown.append({"role": "user", "content": text})
        answer = {"role": "assistant", "content": ""}
        shown.append(answer)
        yield shown, gr.MultimodalTextbox(value=None), cid, gr.update(), "", gr.update()

        key = request.session_hash or "cli"
        cancel = active.start(key)
        session = Session(engine, cid)
        notices, errors = [], []
        done = working = None

        def show(ev) -> None:
            """One event into the chat being drawn."""
            nonlocal done, working
            if isinstance(ev, ToolCall):
                working = ev.name.replace("_", " ")
                answer["content"] = f"🛠️ {working}…"
            elif isinstance(ev, Progress):
                answer["content"] = f"🛠️ {working} · {ev.stage} {ev.fraction:.0%}"
            elif isinstance(ev, Perceived):
                answer["content"] = f"👀 looked at {ev.name}…"
                working = "perception"
            elif isinstance(ev, MediaResult):
                shown.insert(len(shown) - 1, {"role": "assistant",
                                              "content": media_content(ev.path, ev.kind, name=ev.meta.get("name", ""))})
            elif isinstance(ev, TextDelta):
                if working:
                    answer["content"], working = "", None
                answer["content"] += ev.text
            elif isinstance(ev, Notice):
                notices.append(ev.message)
                gr.Info(ev.message)
            elif isinstance(ev, Error):
                errors.append(ev.message)
                answer["content"] += f"\n\n⚠️ {ev.message}"
            elif isinstance(ev, Done):
                done = ev

        turn = Turn(text, tuple(paths))
        try:
            with closing(batched(lambda: session.submit(turn, cancel), cancel)) as batches:
                for batch in batches:
                    for ev in batch:
                        show(ev)
                    if not all(isinstance(ev, Done) for ev in batch):
                        yield shown, gr.update(), session.id, gr.update(), " ".join(notices), gr.update()
        finally:
            active.finish(key, cancel)
        if done is None or not done.turn_id:  # rejected before anything was stored: give the input back
            yield shown, gr.MultimodalTextbox(value=message), session.id, gr.update(), " ".join(errors), gr.update()
            return
        yield (render(engine, session.id), gr.update(), session.id,
               gr.Radio(choices=conversation_choices(engine), value=session.id), turn_footer(done, notices),
               title_of(session.id))

    def stop(request: gr.Request) -> None:
        active.stop(request.session_hash or "cli")

    def title_of(cid: str | None) -> str:
        return (engine.store.get_conversation(cid) or {}).get("title", "") if cid else ""

    def listing(cid: str | None = None) -> gr.Radio:
        return gr.Radio(choices=conversation_choices(engine), value=cid)

    def page_load():
        return listing(), refresh_status()

    def open_conversation(cid: str | None):
        return render(engine, cid), cid, title_of(cid), ""

    def new_chat():
        return [], None, listing(), "", ""

    def gone(cid: str | None) -> bool:
        if cid and engine.store.get_conversation(cid) is None:
            gr.Warning("This conversation no longer exists (deleted in another tab?): pick another one.")
            return True
        return False

    def rename(cid: str | None, title: str):
        if not cid:
            gr.Warning("Open a conversation first, then rename it.")
            return gr.skip()
        if gone(cid):
            return listing()
        try:
            engine.store.rename_conversation(cid, title or "")
        except ValueError as exc:  # an empty title
            gr.Warning(f"Not renamed: {exc}; type one in Title, then Rename.")
            return gr.skip()
        gr.Info(f"Renamed to \u201c{title_of(cid)}\u201d.")
        return listing(cid)

    def delete(cid: str | None, confirmed: bool):
        if not cid:
            gr.Warning("No conversation is open: nothing to delete.")
            return (gr.skip(),) * 5
        if gone(cid):
            return [], None, listing(), "", ""
        if not confirmed:  # the browser asked, and the answer was no
            return (gr.skip(),) * 5
        title = title_of(cid)
        engine.store.delete_conversation(cid)
        gr.Info(f"Deleted \u201c{title}\u201d.")
        return [], None, listing(), "", ""

    def voice_turn_done(conversation: str):
        """A voice turn was stored: show it, and follow the conversation it went to."""
        conversation = conversation or None
        return render(engine, conversation), conversation, listing(conversation), title_of(conversation)

    def set_voice(voice: str, speaking_rate: float):
        problem = voice_problem(voice)
        if problem:
            gr.Warning(problem)
            return gr.skip()
        try:
            engine.set_speech(voice=voice.strip(), rate=speaking_rate)
        except ValueError as exc:
            gr.Warning(f"Not applied: {exc}")
            return gr.skip()
        gr.Info(f"Voice set to {voice.strip()} at {speaking_rate:.2f}x.")
        return refresh_status()

    def refresh_status() -> str:
        return status_markdown(status(engine))

    with gr.Blocks(title="Omni assistant") as demo:
        cid = gr.State(None)
        with gr.Sidebar(label="Conversations", open=True, elem_id="sidebar"):
            new_btn = gr.Button("+ New chat", variant="primary", elem_id="new-chat")
            conversations = gr.Radio(choices=[], value=None, show_label=False,  # filled by demo.load
                                     elem_id="conversations", container=False)
            title_box = gr.Textbox(label="Title", placeholder="Rename this conversation", elem_id="title")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete")
            confirmed = gr.Checkbox(True, visible="hidden", elem_id="delete-confirmed")  # the browser's answer
        gr.Markdown("## Omni assistant\nRuns on this machine. Type or talk; attach images, audio or video; "
                    "ask it to draw, edit, animate or model something (\"crop it to a square\", \"a 3D snowman\").")
        chatbot = gr.Chatbot(elem_id="chat", height=520, buttons=["copy"], feedback_options=None,
                             placeholder="Ask me anything.")
        footer = gr.Markdown(elem_id="turn-info")
        with gr.Row(equal_height=True, elem_id="input-row"):
            box = gr.MultimodalTextbox(placeholder="Message the assistant...", file_count="multiple",
                                       file_types=["image", "audio", "video", ".glb"], show_label=False,
                                       elem_id="input", scale=8, autofocus=True)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
        with gr.Row(equal_height=True, elem_id="voice-row"):
            voice_btn = gr.Button("🎤 Voice mode", elem_id="voice-btn", scale=1, min_width=160)
            gr.HTML('<div id="voice-status">Voice mode is off. Click it and just talk; '
                    'talk over the answer to interrupt.</div><div id="voice-captions"></div>', scale=6)
        voice_cid = gr.Textbox(elem_id="voice-cid", visible="hidden")
        voice_refresh = gr.Button("refresh", elem_id="voice-refresh", visible="hidden")
        with gr.Accordion("Voice settings", open=False, elem_id="voice-settings"):
            with gr.Row():
                voice_pick = gr.Dropdown(choices=voice_names(), value=engine.config.tts.voice, allow_custom_value=True,
                                         label="Voice (a name, or the path of a Piper .onnx voice)", elem_id="voice-pick")
                rate = gr.Slider(0.5, 2.0, value=engine.config.tts.rate, step=0.05, label="Speaking rate",
                                 elem_id="voice-rate")
            apply_voice = gr.Button("Apply", size="sm", elem_id="voice-apply")
        with gr.Accordion("What I saw and heard", open=False, elem_id="perception-panel"):
            # whole pictures: a square cell per picture, the picture contained in it (fit_columns
            # stretched one picture to the full width, a square cut short by the height)
            seen_gallery = gr.Gallery(label="Found in your media", columns=3, fit_columns=False, height=320,
                                      object_fit="contain", elem_id="seen")
            seen_facts = gr.Markdown(NO_PERCEPTION, elem_id="seen-facts")
        with gr.Accordion("Media in this conversation", open=False, elem_id="media-panel"):
            with gr.Row():
                gallery = gr.Gallery(label="Images", columns=4, fit_columns=False, height=240,
                                     object_fit="contain", elem_id="gallery")
                model3d = gr.Model3D(label="Latest 3D model", height=240, elem_id="model3d")
            files = named_files(label="Download", file_count="multiple", interactive=False, elem_id="files")
        with gr.Accordion("Experts (MoE models)", open=False, elem_id="router-panel"):
            router_image = gr.Image(label="Which experts this conversation's last answer used (rows: layers)",
                                    height=200, interactive=False, elem_id="router-heatmap")
            router_line = gr.Markdown(elem_id="router-line")
        with gr.Accordion("Status", open=False, elem_id="status-panel"):
            status_md = gr.Markdown(elem_id="status")  # filled by demo.load
            gr.Timer(5.0).tick(refresh_status, None, status_md, show_progress="hidden", queue=False)

        def show_panels(c):
            """The open conversation's panels, and its id for voice mode (voice.js reads #voice-cid)."""
            return (*panels(engine, c), c or "")

        # Every change of the open conversation ends here (a State's .change does not fire for all of them).
        after = dict(fn=show_panels, inputs=cid, queue=False, show_progress="hidden", api_visibility="undocumented",
                     outputs=[gallery, model3d, files, seen_gallery, seen_facts, router_image, router_line, voice_cid])
        sidebar = [chatbot, cid, conversations, title_box, footer]
        close_on_phone = "(...args) => { window.omniUI && window.omniUI.closeSidebarOnPhone(); return args; }"

        box.submit(respond, [box, cid], [chatbot, box, cid, conversations, footer, title_box],
                   concurrency_id="model", concurrency_limit=1, show_progress="hidden").then(**after)
        stop_btn.click(stop, None, None, concurrency_limit=None, show_progress="hidden", queue=False,
                       js="() => { window.omniVoice && window.omniVoice.interrupt(); }")
        voice_btn.click(None, None, None, js="() => { window.omniVoice.toggle(); }")
        voice_refresh.click(voice_turn_done, voice_cid, [chatbot, cid, conversations, title_box],
                            queue=False).then(**after)
        apply_voice.click(set_voice, [voice_pick, rate], status_md, concurrency_limit=None)
        conversations.input(open_conversation, conversations, [chatbot, cid, title_box, footer], queue=False,
                            js="(c) => { window.omniUI && window.omniUI.closeSidebarOnPhone(); return c; }"
                            ).then(**after)
        new_btn.click(new_chat, None, sidebar, queue=False, js=close_on_phone).then(**after)
        chatbot.clear(new_chat, None, sidebar, queue=False).then(**after)
        rename_btn.click(rename, [cid, title_box], conversations, concurrency_limit=None, show_progress="hidden")
        delete_btn.click(delete, [cid, confirmed], sidebar, concurrency_limit=None, show_progress="hidden",
                         js="(c, ok) => [c, window.omniUI ? window.omniUI.confirmDelete() : true]").then(**after)
        demo.load(page_load, None, [conversations, status_md], queue=False,
                  js=(ASSETS / "ui.js").read_text()).then(**after)
    return demo
