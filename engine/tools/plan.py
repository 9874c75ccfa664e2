"""Output routing: does this message ask for media, which tool, with what arguments.

`plan(engine, text, media)` -> ToolPlan | None. Three steps (HuggingGPT-style,
kept cheap enough to run on every message):
1. Choose the tool. `rules`: clear wording ("crop ...", "draw ...", "a 3D model
   of ...") picks it; `llm`: the LLM chooses among the tools and "chat" by its
   likelihood of each (constrained: it can only answer one of them);
   `hybrid` (default): rules when the wording is clear, else the LLM.
2. Resolve references: "it", "this", "the last image", "the photo I sent",
   "the first picture", or a file name -> a file in the conversation.
3. Arguments. `words`: the user's words go to the backend, whose parser reads
   them ("crop to a square and add the caption 'Summer'"), plus what is clear
   here (seconds, size, trim points); `llm`: the LLM writes the JSON under the
   tool's schema (grammar-constrained), references restricted to real files.
Either way the arguments are validated against the tool's schema.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.errors import Unavailable
from engine.store import HEAD
from generators.base import RequestError, validate
from generators.tools import TOOLS

CHAT = "chat"
# what the LLM chooses between (its words for each tool)
CHOICES = {CHAT: "chat", **{name: tool.words for name, tool in TOOLS.items()}}

_CREATE = r"\b(make|create|generate|draw|paint|sketch|render|design|produce|compose|give me|show me|build|i want|i'd like)\b"
_IMAGE_EDIT = (r"\b(crop|rotate|flip|mirror|resize|scale|brighter|darker|brighten|darken|contrast|saturat\w*|hue|blur"
               r"|sharpen|black and white|gr[ae]yscale|invert|caption|background|recolou?r|tint|bluer|redder|greener"
               r"|warmer|cooler|purple|make the sky|write .* on)\b")
_OBJ = r"(it |this |that |the \w+ |my \w+ )?"
_VIDEO_EDIT = (r"\b(trim|cut|shorten|speed " + _OBJ + r"up|slow " + _OBJ + r"down|slow[- ]?mo\w*|faster|slower|reverse|backwards|mute"
               r"|(remove|drop) the (audio|sound)|silent|gif|frames?|replace the (audio|sound|soundtrack))\b")
_THREE_D = r"\b(3d|3-d|three[- ]d|\.glb|glb|mesh|sculpt\w*)\b"
_VIDEO = r"\b(video|clip|animation|animate|movie|footage)\b"
_AUDIO = (r"\b(sound|sounds|audio|music|melody|tune|jingle|noise|ambien\w*|tone|beep|chime|soundtrack|rain sounds"
          r"|notes?|voice[- ]?over|narration)\b")
_SAY = r"\b(say|saying|read|pronounce|narrate|announce)\b.*[\"“'‘].+[\"”'’]"
_IMAGE = r"\b(picture|image|photo|illustration|drawing|painting|portrait|wallpaper|logo|poster|icon|sketch)\b"
_DRAW = r"\b(draw|paint|sketch|illustrate)\b"
_IMPERATIVE = (r"^\s*(please |can you |could you |now )?(put|add|turn|make|change|remove|keep|cut|give|swap|replace"
               r"|straighten|fix|erase|shrink|enlarge|zoom|play|get rid)\b")
_QUESTION = r"^\s*(what|why|how|who|when|where|which|is|are|can you explain|explain|tell me|describe|do|does)\b"


@dataclass
class ToolPlan:
    name: str
    arguments: dict
    inputs: list = field(default_factory=list)  # MediaRecords the call refers to
    chosen_by: str = "rules"


def _has(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.I) is not None


def rule_choice(text: str, kinds: set[str]) -> str | None:
    """The tool clear wording asks for (None: not clear). `kinds`: media kinds in the conversation."""
    t = text.lower()
    question = _has(_QUESTION, t) and not _has(_CREATE, t)
    if _has(_THREE_D, t):
        return "generate_3d"
    if _has(_SAY, text) and _has(r"\b(audio|recording|voice|clip|video|file|mp3|wav|voice[- ]?over|record)\b", t):
        return "generate_audio"  # spoken words as a sound file (or a voice-over on a video)
    if "video" in kinds and _has(_AUDIO, t) and _has(r"\b(add|put|give|with|over|onto|to (this|the|my))\b", t):
        return "generate_audio"
    if "video" in kinds and _has(_VIDEO_EDIT, t) and not question:
        return "edit_video"
    if "image" in kinds and _has(_IMAGE_EDIT, t) and not question:
        return "edit_image"
    if "image" in kinds and _has(r"\b(make|turn|change|add|remove|replace) (it|this|the|that)\b", t) and not question:
        return "edit_image"
    if question:
        return CHAT if not _has(_DRAW, t) else None  # "can you draw...?" is a request
    if _has(_CREATE, t) or _has(r"^\s*(a|an|some|the)\b", t):
        if _has(_VIDEO, t):
            return "generate_video"
        if _has(_AUDIO, t):
            return "generate_audio"
        if _has(_IMAGE, t) or _has(_DRAW, t):
            return "generate_image"
    if _has(_DRAW, t):
        return "generate_image"
    if _has(r"\banimate\b", t):
        return "generate_video"
    media_words = (_IMAGE, _VIDEO, _AUDIO, _THREE_D, _DRAW, _IMAGE_EDIT, _VIDEO_EDIT)
    command = kinds & {"image", "video"} and _has(_IMPERATIVE, t)  # "put the word SALE across the top"
    if not command and not any(_has(p, t) for p in media_words):
        return CHAT  # nothing about media at all: a plain answer, without asking the LLM
    return None


def llm_choice(llm, text: str, kinds: set[str]) -> str:
    have = f" (the conversation has: {', '.join(sorted(kinds))})" if kinds else ""
    messages = [
        {"role": "system", "content": "Classify the request. Answer with one of: " + ", ".join(CHOICES.values())
         + ". Use chat for questions and conversation."},
        {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "chat"},
        {"role": "user", "content": "Draw a cat wearing a hat"}, {"role": "assistant", "content": "draw image"},
        {"role": "user", "content": "Make the sky purple (the conversation has: image)"},
        {"role": "assistant", "content": "edit image"},
        {"role": "user", "content": "A short clip of waves"}, {"role": "assistant", "content": "make video"},
        {"role": "user", "content": "Cut the first two seconds (the conversation has: video)"},
        {"role": "assistant", "content": "edit video"},
        {"role": "user", "content": "A 3D model of a chair"}, {"role": "assistant", "content": "make 3D model"},
        {"role": "user", "content": "The sound of rain"}, {"role": "assistant", "content": "make sound"},
        {"role": "user", "content": text + have},
    ]
    # only what is possible here: nothing to edit without an image or a video in the conversation
    feasible = [k for k in CHOICES if not (k == "edit_image" and "image" not in kinds)
                and not (k == "edit_video" and "video" not in kinds)]
    words, _ = llm.choose(messages, [CHOICES[k] for k in feasible])
    return {v: k for k, v in CHOICES.items()}[words]


# --- references to earlier media ---

def conversation_media(store, cid: str | None, upto=HEAD) -> list:
    """Every media file of the shown branch (with `upto`, of the branch up to that turn), oldest
    first, as (role, record); spoken voice messages and spoken answers are left out (they are
    not what "it" means)."""
    if not cid or upto is None:
        return []
    return [(t.role, m) for t in store.turns(cid, upto) for m in t.media if not m.spoken]


def resolve(ref: str, kind: str, media: list, text: str = ""):
    """The record of `kind` that `ref` (or the wording in `text`) points at."""
    same = [(role, m) for role, m in media if m.kind == kind]
    if not same:
        return None
    ref = (ref or "").strip().lower()
    for _, m in same:
        if ref and ref == m.name.lower():
            return m
    t = text.lower()
    if ref == "first" or _has(r"\b(first|original)\b", t):
        return same[0][1]
    if ref == "previous" or _has(r"\b(previous|one before|earlier)\b", t):
        return same[-2][1] if len(same) > 1 else same[0][1]
    if _has(r"\b(i (sent|uploaded|attached|gave)|my (photo|picture|image|video|clip))\b", t):
        mine = [m for role, m in same if role == "user"]
        if mine:
            return mine[-1]
    for _, m in reversed(same):  # a file named in the message
        stem = m.name.rsplit(".", 1)[0].lower()
        if len(stem) > 2 and stem in t:
            return m
    return same[-1][1]


# --- arguments from the user's words ---

def _seconds(t: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)[ -]?(s|sec|secs|seconds?)\b", t) or re.search(r"(\d+(?:\.\d+)?)[ -]?(min|minutes?)\b", t)
    if not m:
        words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "eight": 8, "ten": 10}
        m2 = re.search(r"\b(" + "|".join(words) + r")[ -]second", t)
        return float(words[m2.group(1)]) if m2 else None
    value = float(m.group(1))
    return value * 60 if m.group(2).startswith("min") else value


def _video_edit(t: str) -> dict:
    if _has(r"\bgif\b", t):
        return {"operation": "to_gif"}
    if _has(r"\bframes?\b", t):
        n = re.search(r"(\d+)\s+(key)?frames", t)
        return {"operation": "extract_frames", **({"count": int(n.group(1))} if n else {})}
    if _has(r"\b(reverse|backwards)\b", t):
        return {"operation": "reverse"}
    if _has(r"\breplace the (audio|sound|soundtrack)\b", t):
        return {"operation": "replace_audio", "audio": "last"}
    if _has(r"\b(mute|silent|remove the (audio|sound)|drop the (audio|sound))\b", t):
        return {"operation": "mute"}
    if _has(r"\b(speed " + _OBJ + r"up|faster|slow " + _OBJ + r"down|slower|slow[- ]?mo\w*|\d+(\.\d+)?x)\b", t):
        m = re.search(r"(\d+(?:\.\d+)?)\s*(x|times)", t)
        factor = float(m.group(1)) if m else 2.0
        if _has(r"\b(slow|slower|slow[- ]?mo\w*)\b", t):
            factor = 1 / factor
        return {"operation": "speed", "factor": round(factor, 3)}
    out = {"operation": "trim"}
    m = re.search(r"from (\d+(?:\.\d+)?)\s*(?:s|sec\w*)? to (\d+(?:\.\d+)?)", t)
    if m:
        return {**out, "start_s": float(m.group(1)), "end_s": float(m.group(2))}
    secs = _seconds(t)
    if secs is not None and _has(r"\b(first|keep|to)\b", t):
        return {**out, "start_s": 0.0, "end_s": secs}
    if secs is not None:
        return {**out, "start_s": secs}
    return out


def words_arguments(name: str, text: str) -> dict:
    t = text.lower()
    if name == "edit_image":
        return {"instruction": text}
    if name == "edit_video":
        return _video_edit(t)
    args: dict = {"prompt": text}
    secs = _seconds(t)
    if name == "generate_video" and secs is not None:
        args["seconds"] = secs
    if name == "generate_audio" and secs is not None:
        args["seconds"] = secs
    if name == "generate_image":
        m = re.search(r"(\d{2,4})\s*[x×]\s*(\d{2,4})", t)
        if m:
            args["width"], args["height"] = int(m.group(1)), int(m.group(2))
    return args


def _schema_with_refs(schema: dict, refs, media: list) -> dict:
    """The tool's schema with each reference field limited to the files that exist."""
    props = dict(schema["properties"])
    for fld, kind in refs:
        if fld in props:
            names = ["last", "first", "previous", *dict.fromkeys(m.name for _, m in media if m.kind == kind)]
            props[fld] = {**{k: v for k, v in props[fld].items() if k not in ("maxLength", "minLength")},
                          "type": "string", "enum": names}
            if props[fld].get("default", "last") not in names:
                props[fld]["default"] = "last"
    return {**schema, "properties": props}


def llm_arguments(llm, name: str, text: str, media: list, cancel=None) -> dict:
    tool = TOOLS[name]
    names = [m.name for _, m in media]
    messages = [{"role": "system", "content": f"Write the JSON arguments of the {name} tool: {tool.description}"
                 + (f" Files in the conversation: {', '.join(names)}." if names else "")},
                {"role": "user", "content": text}]
    args, _ = llm.json_call(messages, _schema_with_refs(tool.schema, tool.refs, media), cancel)
    return args


def _local_llm(engine):
    """The loaded LLM when it can score choices and constrain decoding (local weights), else None:
    an unavailable or remote model leaves the choice to the rules and the arguments to the words."""
    try:
        llm = engine.roles["llm"].get()
    except Unavailable:
        return None
    return llm if llm.constrained else None


def plan(engine, text: str, media: list, attached: tuple = (), cancel=None) -> ToolPlan | None:
    """The tool call this message asks for, or None for a plain answer.
    `media`: conversation_media(); `attached`: records sent with this message."""
    cfg = engine.config.generators
    if not cfg.tools or not text.strip():
        return None
    media = list(media) + [("user", m) for m in attached]
    kinds = {m.kind for _, m in media}
    name, by = None, "rules"
    if cfg.router in ("rules", "hybrid"):
        name = rule_choice(text, kinds)
    if name is None and cfg.router in ("llm", "hybrid") and (llm := _local_llm(engine)) is not None:
        with engine.model_use():
            name, by = llm_choice(llm, text, kinds), "llm"
    if name in (None, CHAT):
        return None
    if cfg.arguments == "llm" and (llm := _local_llm(engine)) is not None:
        with engine.model_use():
            args = llm_arguments(llm, name, text, media, cancel)
    else:
        args = words_arguments(name, text)
    inputs = []
    tool = TOOLS[name]
    for fld, kind in tool.refs:
        default = tool.schema["properties"][fld].get("default")
        optional = default == ""
        if optional and fld not in args:
            mentioned = _has(r"\b(this|it|that|the (photo|picture|image|video|clip))\b", text) or \
                any(m.kind == kind for m in attached)
            if not (mentioned and any(m.kind == kind for _, m in media)):
                continue
            args[fld] = "last"
        record = resolve(args.get(fld, "last"), kind, media, text)
        if record is None:
            if optional:
                args.pop(fld, None)
                continue
            raise RequestError(f"There is no {kind} in this conversation to {name.replace('_', ' ')}: "
                               f"attach one first.")
        args[fld] = record.name
        inputs.append(record)
    accepted = {kind for _, kind in tool.refs}
    other = sorted({m.kind for m in attached} - accepted)
    if other and not inputs and _has(r"\b(this|it|that)\b", text):
        what = f"{'an' if tool.kind.noun[0] in 'aeiou' else 'a'} {tool.kind.noun}" if name.startswith("generate") \
            else name.replace("_", " ")
        uses = " or ".join(sorted(accepted)) or "a description"
        raise RequestError(f"I can't make {what} from {' or '.join(other)}: it works from a description"
                           f"{' or an ' + uses if accepted else ''}.")
    args = validate(tool.schema, args)
    return ToolPlan(name, args, inputs, by)
