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

from pathlib import Path

import gradio as gr

from app.panels import NO_PERCEPTION, media_content, message_turns, model_title, named_files, panels, render
from app.ui_library import Library
from app.ui_page import SHORTCUTS, math_chat
from app.ui_chat import ActiveTurns, Drawn, model_choices, plain_file_refusals, stream, turn_footer
from engine.engine import Engine
from engine.session import Session, Turn
from engine.status import status, status_markdown

ASSETS = Path(__file__).resolve().parents[1] / "assets"


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
        drawn = Drawn(shown)
        yield drawn.shown, gr.MultimodalTextbox(value=None), cid, gr.update(), "", gr.update()
        session = Session(engine, cid)
        turn = Turn(text, tuple(paths))
        for _ in stream(active, request.session_hash or "cli", lambda cancel: session.submit(turn, cancel), drawn):
            yield drawn.shown, gr.update(), session.id, gr.update(), " ".join(drawn.notices), gr.update()
        if not drawn.stored:  # rejected before anything was stored: give the input back
            yield (drawn.shown, gr.MultimodalTextbox(value=message), session.id, gr.update(), " ".join(drawn.errors),
                   gr.update())
            return
        chat, c, conversations, footer, title = finished(session.id, drawn)
        yield chat, gr.update(), c, conversations, footer, title

    def finished(c: str, drawn: Drawn) -> tuple:
        """The chat as stored once a turn is done: (chat, cid, list, footer, title)."""
        return render(engine, c), c, listing(c), turn_footer(drawn.done, drawn.notices), title_of(c)

    def again(cid: str | None, request: gr.Request):
        """The last answer answered again (Gradio's retry button): a sibling of it, shown."""
        turns = engine.store.turns(cid) if cid and not gone(cid) else []
        if not turns or turns[-1].role != "assistant":
            gr.Warning("There is no answer here to answer again.")
            yield (gr.skip(),) * 5
            return
        shown = render(engine, cid, upto=turns[-1].parent_id)
        yield from run_branch(cid, shown, lambda session, cancel: session.regenerate(turns[-1].id, cancel), request)

    def edit(cid: str | None, edited: gr.EditData, request: gr.Request):
        """A sent message edited and sent again: a sibling of it, answered; the old branch kept."""
        if not cid or gone(cid):
            yield (gr.skip(),) * 5
            return
        at = message_turns(engine, cid)
        turn = engine.store.turn(cid, at[edited.index]) if 0 <= edited.index < len(at) else None
        text = edited.value if isinstance(edited.value, str) else ""
        if turn is None or turn.role != "user" or not text.strip():
            gr.Warning("Only the text of a message you sent can be edited (type the new text, then send).")
            yield render(engine, cid), *(gr.skip(),) * 4
            return
        files = [m for m in turn.media if not m.spoken]
        shown = render(engine, cid, upto=turn.parent_id) if turn.parent_id else []
        shown += [{"role": "user", "content": media_content(m.path, m.kind, m.mime, m.name)} for m in files]
        shown.append({"role": "user", "content": text})
        resend = Turn(text, tuple(m.path for m in files), tuple(m.name for m in files))
        yield from run_branch(cid, shown, lambda session, cancel: session.submit(resend, cancel,
                                                                                 parent=turn.parent_id or 0), request)

    def run_branch(cid: str, shown: list, run, request: gr.Request):
        """Stream a turn that branches the conversation: (chat, cid, list, footer, title)."""
        drawn = Drawn(shown)
        session = Session(engine, cid)
        yield drawn.shown, cid, gr.skip(), "", gr.skip()
        for _ in stream(active, request.session_hash or "cli", lambda cancel: run(session, cancel), drawn):
            yield drawn.shown, cid, gr.skip(), " ".join(drawn.notices), gr.skip()
        if not drawn.stored:
            yield render(engine, cid), cid, gr.skip(), " ".join(drawn.errors), gr.skip()
            return
        yield finished(cid, drawn)

    def switch(cid: str | None, target: str):
        """A "‹ ›" link: show the branch through turn `target` (ends at its newest turn)."""
        if not cid or gone(cid):
            return gr.skip(), gr.skip()
        try:
            engine.store.show(cid, int(target))
        except (KeyError, ValueError):
            gr.Warning("That version of the conversation is gone.")
        return render(engine, cid), ""

    def load_settings(c: str | None):
        own = engine.store.settings(c) if c else {}
        return (own.get("instructions", ""), own.get("model") or engine.config.llm.model,
                own.get("temperature", engine.config.llm.temperature))

    def save_settings(c: str | None, instructions: str, model: str, temperature: float):
        """This conversation's instructions, model and temperature (a new chat is made for them)."""
        instructions = (instructions or "").strip()
        if len(instructions) > engine.config.max_prompt_chars:
            gr.Warning(f"The instructions are {len(instructions):,} characters; the limit is "
                       f"{engine.config.max_prompt_chars:,}.")
            return gr.skip(), gr.skip()
        if model not in engine.llm_choices():
            gr.Warning(f"There is no model {model!r} here.")
            return gr.skip(), gr.skip()
        if c and gone(c):
            return gr.skip(), gr.skip()
        c = c or engine.store.create_conversation("New chat")
        own = {"instructions": instructions, "temperature": round(float(temperature), 2),
               **({"model": model} if model != engine.config.llm.model else {})}
        engine.store.set_settings(c, {k: v for k, v in own.items() if v != ""})
        gr.Info(f"This conversation now answers with {model_title(model)} at temperature {own['temperature']}"
                + (" and your instructions." if instructions else " and the default instructions."))
        if engine.llm_state(model)[0] == "not loaded":
            engine.load_llm(model)  # in the background: ready by the next message, or soon after
        return c, listing(c)

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
            library = Library(engine)
            library.search_controls()  # above the list: typing filters it
            conversations = gr.Radio(choices=[], value=None, label="Conversations", show_label=False,
                                     elem_id="conversations", container=False)  # filled by demo.load
            title_box = gr.Textbox(label="Title", placeholder="Rename this conversation", elem_id="title")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete")
            confirmed = gr.Checkbox(True, visible="hidden", elem_id="delete-confirmed")  # the browser's answer
            library.transfer_controls()  # export the open conversation, import one
            gr.Markdown(SHORTCUTS, elem_id="shortcuts")
        gr.Markdown("# Omni assistant\nRuns on this machine. Type or talk; attach images, audio or video; "
                    "ask it to draw, edit, animate or model something (\"crop it to a square\", \"a 3D snowman\").")
        chatbot = math_chat(gr.Chatbot(elem_id="chat", height=520, buttons=["copy"], feedback_options=None,
                                       placeholder="Ask me anything.", editable="user", label="Conversation",
                                       show_label=False))
        footer = gr.Markdown(elem_id="turn-info")
        branch_to = gr.Textbox(elem_id="branch-to", visible="hidden")  # the turn a "‹ ›" link shows (chat.js)
        branch_go = gr.Button("show", elem_id="branch-go", visible="hidden")
        with gr.Row(equal_height=True, elem_id="input-row"):
            box = plain_file_refusals(gr.MultimodalTextbox(
                placeholder="Message the assistant...", file_count="multiple", file_types=["image", "audio", "video", ".glb"],
                show_label=False, label="Message", elem_id="input", scale=8, autofocus=True))
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
        with gr.Row(equal_height=True, elem_id="voice-row"):
            voice_btn = gr.Button("🎤 Voice mode", elem_id="voice-btn", scale=1, min_width=160)
            gr.HTML('<div id="voice-status">Voice mode is off. Click it and just talk; '
                    'talk over the answer to interrupt.</div><div id="voice-captions"></div>', scale=6)
        voice_cid = gr.Textbox(elem_id="voice-cid", visible="hidden")
        voice_refresh = gr.Button("refresh", elem_id="voice-refresh", visible="hidden")
        with gr.Accordion("This conversation: instructions and model", open=False, elem_id="chat-settings"):
            instructions = gr.Textbox(label="Instructions (what the assistant is told before this conversation)",
                                      placeholder=engine.config.system_prompt, lines=3, max_lines=12,
                                      elem_id="instructions")
            with gr.Row():
                model_pick = gr.Dropdown(choices=model_choices(engine), value=engine.config.llm.model,
                                         label="Model", elem_id="model-pick")
                temperature = gr.Slider(0.0, 2.0, value=engine.config.llm.temperature, step=0.05,
                                        label="Temperature", elem_id="temperature")
            save_settings_btn = gr.Button("Save for this conversation", size="sm", elem_id="settings-save")
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
            """The open conversation's panels, its settings, and its id for voice mode (voice.js reads
            #voice-cid)."""
            return (*panels(engine, c), *load_settings(c), c or "")

        # Every change of the open conversation ends here (a State's .change does not fire for all of them).
        after = dict(fn=show_panels, inputs=cid, queue=False, show_progress="hidden", api_visibility="undocumented",
                     outputs=[gallery, model3d, files, seen_gallery, seen_facts, router_image, router_line,
                              instructions, model_pick, temperature, voice_cid])
        branched = [chatbot, cid, conversations, footer, title_box]
        sidebar = [chatbot, cid, conversations, title_box, footer]
        close_on_phone = "(...args) => { window.omniUI && window.omniUI.closeSidebarOnPhone(); return args; }"

        box.submit(respond, [box, cid], [chatbot, box, cid, conversations, footer, title_box],
                   concurrency_id="model", concurrency_limit=1, show_progress="hidden").then(**after)
        chatbot.retry(again, cid, branched, concurrency_id="model", concurrency_limit=1,
                      show_progress="hidden").then(**after)
        chatbot.edit(edit, cid, branched, concurrency_id="model", concurrency_limit=1,
                     show_progress="hidden").then(**after)
        branch_go.click(switch, [cid, branch_to], [chatbot, branch_to], queue=False, show_progress="hidden",
                        js="(c, t) => [c, window.omniChat ? window.omniChat.target : t]").then(**after)
        save_settings_btn.click(save_settings, [cid, instructions, model_pick, temperature], [cid, conversations],
                                concurrency_limit=None, show_progress="hidden").then(**after)
        stop_btn.click(stop, None, None, concurrency_limit=None, show_progress="hidden", queue=False,
                       js="() => { window.omniVoice && window.omniVoice.interrupt(); }")
        voice_btn.click(None, None, None, js="() => { window.omniVoice.toggle(); }")
        voice_refresh.click(voice_turn_done, voice_cid, [chatbot, cid, conversations, title_box],
                            queue=False).then(**after)
        apply_voice.click(set_voice, [voice_pick, rate], status_md, concurrency_limit=None)
        conversations.input(open_conversation, conversations, [chatbot, cid, title_box, footer], queue=False,
                            js="(c) => { window.omniUI && window.omniUI.closeSidebarOnPhone(); return c; }"
                            ).then(**after)
        library.wire(conversations=conversations, cid=cid, open_fn=open_conversation,
                     open_outputs=[chatbot, cid, title_box, footer], after=after)
        new_btn.click(new_chat, None, sidebar, queue=False, js=close_on_phone).then(**after)
        chatbot.clear(new_chat, None, sidebar, queue=False).then(**after)
        rename_btn.click(rename, [cid, title_box], conversations, concurrency_limit=None, show_progress="hidden")
        delete_btn.click(delete, [cid, confirmed], sidebar, concurrency_limit=None, show_progress="hidden",
                         js="(c, ok) => [c, window.omniUI ? window.omniUI.confirmDelete() : true]").then(**after)
        demo.load(page_load, None, [conversations, status_md], queue=False,
                  js="() => { for (const run of [" + ",".join((ASSETS / name).read_text() for name in (
                      "ui.js", "read_aloud.js", "page.js", "chat.js")) + "]) run(); }").then(**after)
    return demo
