"""The browser UI: Gradio Blocks over the engine.

Thin by design: it turns clicks into `Session.submit` calls and events into
chat updates. Model work goes through one queue (concurrency_id "model");
Stop sets the turn's CancelToken, so decoding stops within one token and
the partial answer is stored as interrupted.
"""
from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from engine.events import CancelToken, Done, Error, MediaResult, Notice, Perceived, Progress, TextDelta, ToolCall
from engine.engine import Engine
from engine.session import Turn
from engine.status import status, status_markdown

ASSETS = Path(__file__).resolve().parents[1] / "assets"
INTERRUPTED = "\n\n*(interrupted)*"


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


def render(engine: Engine, cid: str | None) -> list[dict]:
    """Stored turns -> Chatbot messages (media first, then the text)."""
    if not cid:
        return []
    out: list[dict] = []
    for turn in engine.store.turns(cid):
        for rec in turn.media:
            out.append({"role": turn.role, "content": _media_content(rec.path, rec.kind, rec.mime, rec.name)})
        text = turn.content
        if turn.status == "interrupted":
            text += INTERRUPTED
        if turn.meta.get("error"):
            text += f"\n\n⚠️ {turn.meta['error']}"
        if text or not turn.media:
            out.append({"role": turn.role, "content": text})
    return out


def _media_content(path: str, kind: str, mime: str = "", name: str = ""):
    if kind == "model3d":  # a 3D viewer inside the chat
        return gr.Model3D(value=path, label=name or "3D model", height=320)
    return {"path": path, "mime_type": mime or None, "orig_name": name or Path(path).name}


def media_panel(engine: Engine, cid: str | None):
    """The conversation's media for the side panel: images, the latest 3D model, every file."""
    records = [m for t in engine.store.turns(cid) for m in t.media if m.name != "answer.wav"] if cid else []
    images = [(m.path, m.name) for m in records if m.kind == "image"]
    models = [m.path for m in records if m.kind == "model3d"]
    return (gr.Gallery(value=images or None), gr.Model3D(value=models[-1] if models else None),
            gr.File(value=[m.path for m in records] or None))


def perception_panel(engine: Engine, cid: str | None):
    """What the perception tools found in the latest message with media: the annotated
    images (text boxes, faces, keyframe sheets) and the facts the answer was grounded in."""
    turns = [t for t in engine.store.turns(cid) if t.role == "user" and t.meta.get("perception")] if cid else []
    if not turns:
        return gr.Gallery(value=None), gr.Markdown("Nothing looked at yet: attach an image, audio or video.")
    meta = turns[-1].meta
    pictures = [(p, name) for name, paths in meta.get("overlays", {}).items() for p in paths if Path(p).is_file()]
    facts = "\n\n".join(f"**{name}**: {text}" for name, text in meta["perception"].items())
    return gr.Gallery(value=pictures or None), gr.Markdown(facts)


ORDER = ("text", "image", "video", "audio", "other")


def router_view(stats: dict | None):
    """The last answer's MoE routing as a heatmap: one band per modality (text, image,
    video, ...), in each a row per MoE layer, a column per expert, brighter = chosen more
    often by that modality's tokens; and a line on the bands and the expert cache."""
    import numpy as np
    from PIL import Image

    if not stats:
        return None, "The language model is dense (no experts): nothing to show."
    layers = sorted(stats["layers"].items(), key=lambda kv: int(kv[0]))
    found = {name for _, mods in layers for name, m in mods.items() if isinstance(m, dict) and "counts" in m}
    modalities = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    bands, tokens = [], {}
    for name in modalities:
        grid = np.zeros((len(layers), stats["num_experts"]), np.float32)
        for row, (_, mods) in enumerate(layers):
            if isinstance(mods.get(name), dict):
                grid[row] = np.asarray(mods[name]["counts"], np.float32)
                tokens[name] = mods[name]["tokens"]
        bands += [grid / max(1.0, float(grid.max())), np.full((1, grid.shape[1]), -1.0, np.float32)]
    grid = np.concatenate(bands[:-1]) if bands else np.zeros((1, stats["num_experts"]), np.float32)
    rgb = np.stack([np.clip(grid, 0, 1) ** 0.5 * 255, np.clip(grid, 0, 1) * 180, 60 + np.clip(grid, 0, 1) * 40], -1)
    rgb[grid < 0] = 255  # white lines between the bands
    scale = max(1, 512 // max(grid.shape))
    image = Image.fromarray(rgb.astype(np.uint8)).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                          Image.NEAREST)
    line = f"{len(layers)} MoE layers x {stats['num_experts']} experts, top-{stats['top_k']}; bands from the top: " \
        + ", ".join(f"{name} ({tokens.get(name, 0)} tokens)" for name in modalities)
    cache = stats.get("cache")
    if cache:
        accuracy = cache.get("prefetch_accuracy")
        line += (f". Expert cache: hit rate {cache['hit_rate']:.0%}, {cache['resident_experts']} experts resident, "
                 f"{cache['bytes_moved'] / 2**20:.1f} MiB moved"
                 + (f", prefetch accuracy {accuracy:.0%}" if accuracy is not None else ""))
    else:
        line += ". All experts resident (no --vram-gb budget)"
    return image, line


def voice_names() -> list[str]:
    from engine.packaged import names

    return names("tts")


def conversation_choices(engine: Engine) -> list[tuple[str, str]]:
    return [(c["title"] or "New chat", c["id"]) for c in engine.store.list_conversations()]


def _stats(done: Done) -> str:
    n, t = done.usage.get("completion_tokens", 0), done.timings
    bits = [f"{n} tokens"]
    if t.get("decode_tok_s"):
        bits.append(f"{t['decode_tok_s']:.1f} tok/s")
    if t.get("ttft_ms") is not None:
        bits.append(f"first token {t['ttft_ms']:.0f} ms")
    if done.interrupted:
        bits.append("stopped")
    return "<small>" + " · ".join(bits) + "</small>"


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
        session = engine.session(cid)
        notices, errors, done, working = [], [], None, None
        try:
            for ev in session.submit(Turn(text, tuple(paths)), cancel):
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
                                                  "content": _media_content(ev.path, ev.kind, name=ev.meta.get("name", ""))})
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
                    continue
                yield shown, gr.update(), session.id, gr.update(), " ".join(notices), gr.update()
        finally:
            active.finish(key, cancel)
        if done is None or not done.turn_id:  # rejected before anything was stored: give the input back
            yield shown, gr.MultimodalTextbox(value=message), session.id, gr.update(), " ".join(errors), gr.update()
            return
        footer = " ".join(notices + [_stats(done)])
        yield (render(engine, session.id), gr.update(), session.id,
               gr.Radio(choices=conversation_choices(engine), value=session.id), footer, title_of(session.id))

    def stop(request: gr.Request) -> None:
        active.stop(request.session_hash or "cli")

    def title_of(cid: str | None) -> str:
        return (engine.store.get_conversation(cid) or {}).get("title", "") if cid else ""

    def open_conversation(cid: str | None):
        return render(engine, cid), cid, title_of(cid), ""

    def new_chat():
        return [], None, gr.Radio(choices=conversation_choices(engine), value=None), "", ""

    def rename(cid: str | None, title: str):
        if not cid:
            raise gr.Error("Open a conversation first, then rename it.")
        try:
            engine.store.rename_conversation(cid, title)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return gr.Radio(choices=conversation_choices(engine), value=cid)

    def delete(cid: str | None):
        if cid:
            engine.store.delete_conversation(cid)
        return [], None, gr.Radio(choices=conversation_choices(engine), value=None), "", ""

    def voice_turn_done(conversation: str):
        """A voice turn was stored: show it, and follow the conversation it went to."""
        conversation = conversation or None
        return (render(engine, conversation), conversation,
                gr.Radio(choices=conversation_choices(engine), value=conversation), title_of(conversation))

    def set_voice(voice: str, speaking_rate: float) -> str:
        try:
            engine.set_speech(voice=voice, rate=speaking_rate)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        gr.Info(f"Voice set to {voice} at {speaking_rate:.2f}x.")
        return refresh_status()

    def refresh_status() -> str:
        return status_markdown(status(engine))

    with gr.Blocks(title="Omni assistant") as demo:
        cid = gr.State(None)
        with gr.Sidebar(label="Conversations", open=True):
            new_btn = gr.Button("+ New chat", variant="primary", elem_id="new-chat")
            conversations = gr.Radio(choices=conversation_choices(engine), value=None, show_label=False,
                                     elem_id="conversations", container=False)
            title_box = gr.Textbox(label="Title", placeholder="Rename this conversation", elem_id="title")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete")
        gr.Markdown("## Omni assistant\nRuns on this machine. Type or talk; attach images, audio or video; "
                    "ask it to draw, edit, animate or model something (\"crop it to a square\", \"a 3D snowman\").")
        chatbot = gr.Chatbot(elem_id="chat", height=520, buttons=["copy"], feedback_options=None,
                             placeholder="Ask me anything.")
        footer = gr.Markdown(elem_id="turn-info")
        with gr.Row(equal_height=True):
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
            seen_gallery = gr.Gallery(label="Found in your media", columns=3, height=240, elem_id="seen")
            seen_facts = gr.Markdown(elem_id="seen-facts")
        with gr.Accordion("Media in this conversation", open=False, elem_id="media-panel"):
            with gr.Row():
                gallery = gr.Gallery(label="Images", columns=4, height=240, elem_id="gallery")
                model3d = gr.Model3D(label="Latest 3D model", height=240, elem_id="model3d")
            files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files")
        with gr.Accordion("Experts (MoE models)", open=False, elem_id="router-panel"):
            router_image = gr.Image(label="Which experts the last answer used (rows: layers)", height=200,
                                    interactive=False, elem_id="router-heatmap")
            router_line = gr.Markdown(elem_id="router-line")
        with gr.Accordion("Status", open=False, elem_id="status-panel"):
            status_md = gr.Markdown(refresh_status(), elem_id="status")
            gr.Timer(5.0).tick(refresh_status, None, status_md, show_progress="hidden", queue=False)

        panel = [gallery, model3d, files, seen_gallery, seen_facts, router_image, router_line]

        def panels(c):
            return (*media_panel(engine, c), *perception_panel(engine, c), *router_view(engine.last_router_stats))

        box.submit(respond, [box, cid], [chatbot, box, cid, conversations, footer, title_box],
                   concurrency_id="model", concurrency_limit=1, show_progress="hidden").then(
            panels, cid, panel, queue=False)
        cid.change(panels, cid, panel, queue=False)
        stop_btn.click(stop, None, None, concurrency_limit=None, show_progress="hidden", queue=False,
                       js="() => { window.omniVoice && window.omniVoice.interrupt(); }")
        voice_btn.click(None, None, None, js="() => { window.omniVoice.toggle(); }")
        cid.change(lambda c: c or "", cid, voice_cid, queue=False)
        voice_refresh.click(voice_turn_done, voice_cid, [chatbot, cid, conversations, title_box], queue=False)
        apply_voice.click(set_voice, [voice_pick, rate], status_md, queue=False)
        conversations.input(open_conversation, conversations, [chatbot, cid, title_box, footer], queue=False)
        new_btn.click(new_chat, None, [chatbot, cid, conversations, title_box, footer], queue=False)
        chatbot.clear(new_chat, None, [chatbot, cid, conversations, title_box, footer], queue=False)
        rename_btn.click(rename, [cid, title_box], conversations, queue=False)
        delete_btn.click(delete, cid, [chatbot, cid, conversations, title_box, footer], queue=False)
        demo.load(lambda: gr.Radio(choices=conversation_choices(engine)), None, conversations, queue=False)
    return demo
