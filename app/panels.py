"""What the page shows of one conversation: its chat, its media, what was looked at, its experts.

Every function takes the conversation id and reads the store, never the shared
engine's last result, so the panels always show the open conversation's own
(after a switch, a new chat, a delete or a reload alike).
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData, ListFiles

from engine.store import HEAD

INTERRUPTED = "\n\n*(interrupted)*"
ORDER = ("text", "image", "video", "audio", "other")
NO_PERCEPTION = "Nothing looked at yet: attach an image, audio or video."


def named_files(**kwargs) -> gr.File:
    """A download list whose files carry the media record's name ("lighthouse-crop.png"):
    its value is (path, name) pairs, where gr.File names a file by its path (a content hash
    in the store). A hook on the instance, not a subclass: Gradio writes a .pyi stub beside
    the source of every component subclass. Handlers return plain pairs (not gr.File(...)),
    so that this instance's postprocess is the one that runs."""
    files = gr.File(**kwargs)
    plain = files.postprocess

    def postprocess(value):
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            return ListFiles(root=[FileData(path=path, orig_name=name, size=Path(path).stat().st_size)
                                   for path, name in value])
        return plain(value)

    files.postprocess = postprocess
    return files


def render(engine, cid: str | None, upto=HEAD) -> list[dict]:
    """Stored turns of the shown branch (with `upto`, of the branch up to that turn) -> Chatbot
    messages: media first, then the text."""
    return rendered(engine, cid, upto)[0]


def message_turns(engine, cid: str | None) -> list[int]:
    """The stored turn each message of `render(engine, cid)` shows, by message index."""
    return rendered(engine, cid)[1]


def rendered(engine, cid: str | None, upto=HEAD) -> tuple[list[dict], list[int]]:
    if not cid or upto is None:
        return [], []
    store = engine.store
    out: list[dict] = []
    ids: list[int] = []
    siblings = store.alternatives(cid, upto)
    for turn in store.turns(cid, upto):
        for rec in turn.media:
            out.append({"role": turn.role, "content": media_content(rec.path, rec.kind, rec.mime, rec.name)})
            ids.append(turn.id)
        text = turn.content
        if turn.status == "interrupted":
            text += INTERRUPTED
        if turn.meta.get("error") and turn.meta["error"] not in text:
            text += f"\n\n⚠️ {turn.meta['error']}"
        marks = turn_marks(turn, siblings.get(turn.id, [turn.id]))
        if text or not turn.media or marks:
            out.append({"role": turn.role, "content": text + marks})
            ids.append(turn.id)
    return out, ids


def turn_marks(turn, siblings: list[int]) -> str:
    """The line closing a message: the model that wrote an answer, and "‹ 2/3 ›" where the
    message was edited or the answer asked for again (links assets/chat.js follows). It sits
    in a span of its own (class turn-meta), which read aloud and copy leave out."""
    model = turn.meta.get("model") if turn.role == "assistant" else None
    bits = [html.escape(model_title(model))] if model else []
    if len(siblings) > 1:  # (the sanitizer drops aria-* attributes: hidden words name the links)
        at, what = siblings.index(turn.id), "answer" if turn.role == "assistant" else "version"
        link = lambda to, sign, word: (  # noqa: E731
            f'<a href="#turn-{to}" class="branch">{sign}<span class="sr-only"> {word} {what}</span></a>' if to
            else f'<span class="branch-end">{sign}</span>')
        bits.append(f"{link(siblings[at - 1] if at else 0, '‹', 'previous')} "
                    f'<span class="sr-only">{what} </span>{at + 1}/{len(siblings)} '
                    f"{link(siblings[at + 1] if at + 1 < len(siblings) else 0, '›', 'next')}")
    return f'\n\n<span class="turn-meta">{" · ".join(bits)}</span>' if bits else ""


def model_title(name: str) -> str:
    """How the page names an LLM: its manifest title without the file format, else its name."""
    from engine.packaged import manifest

    entry = manifest().get("llm", {}).get(name) or {}
    title = entry.get("title", "") or name.rstrip("/").rsplit("/", 1)[-1]
    return title.split(" (")[0]


def media_content(path: str, kind: str, mime: str = "", name: str = ""):
    if kind == "model3d":  # a 3D viewer inside the chat
        return gr.Model3D(value=path, label=name or "3D model", height=320)
    return {"path": path, "mime_type": mime or None, "orig_name": name or Path(path).name}


def media_panel(engine, cid: str | None):
    """The conversation's media for the side panel: images, the latest 3D model, and every
    file as (path, name) for `named_files` (downloaded under its own name)."""
    records = [m for t in engine.store.turns(cid) for m in t.media
               if not (m.spoken and t.role == "assistant")] if cid else []  # (spoken answers play in the chat)
    images = [(m.path, m.name) for m in records if m.kind == "image"]
    models = [m.path for m in records if m.kind == "model3d"]
    return (gr.Gallery(value=images or None), gr.Model3D(value=models[-1] if models else None),
            [(m.path, m.name) for m in records] or None)


def perception_panel(engine, cid: str | None):
    """What the perception tools found in the latest message with media: the annotated
    images (text boxes, faces, keyframe sheets) and the facts the answer was grounded in."""
    turns = [t for t in engine.store.turns(cid) if t.role == "user" and t.meta.get("perception")] if cid else []
    if not turns:
        return gr.Gallery(value=None), gr.Markdown(NO_PERCEPTION)
    meta = turns[-1].meta
    pictures = [(p, name) for name, paths in meta.get("overlays", {}).items() for p in paths if Path(p).is_file()]
    facts = "\n\n".join(f"**{name}**: {text}" for name, text in meta["perception"].items())
    return gr.Gallery(value=pictures or None), gr.Markdown(facts)


def router_panel(engine, cid: str | None):
    """The Experts panel for this conversation: the routing of its last answer, as stored
    with that answer (turn meta "router_stats"); nothing when none was stored."""
    answers = [t for t in engine.store.turns(cid) if t.role == "assistant"] if cid else []
    if not answers:
        return None, "Nothing answered yet in this conversation."
    stats = answers[-1].meta.get("router_stats")
    if not stats:
        return None, "No expert routing was recorded with this conversation's last answer (dense models have none)."
    return router_view(stats)


def router_view(stats: dict | None):
    """An answer's MoE routing as a heatmap: one band per modality (text, image,
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


def panels(engine, cid: str | None) -> tuple:
    """Every side panel for `cid`, in the order of the page's panel outputs."""
    return (*media_panel(engine, cid), *perception_panel(engine, cid), *router_panel(engine, cid))
