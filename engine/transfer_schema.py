"""What an imported conversation file must look like, checked field by field.

A small validator of our own (jsonschema is a dev extra only, and a schema would not say
"turn 7 follows turn 9, which comes after it"). `plan` turns a parsed export into a `Plan`
the importer can insert without another check, or raises InputError naming the item that
is wrong (turn 3, media file 2) and how. Bounds: turns, media files, text sizes, and the
shape of the turn meta the page and the model read back (a tool call, perception facts,
MoE routing), so an imported turn cannot break or exhaust what reads it later.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from engine.errors import InputError
from engine.perception.base import printable

FORMAT = "omni-assistant/conversation"
VERSION = 1
MAX_TURNS = 5000
MAX_MEDIA = 500
MAX_TURN_MEDIA = 64
MAX_CONTENT = 1_000_000  # characters of one turn
MAX_VALUES = 5_000_000  # JSON values in a file (a long MoE conversation's routing stats included)
MAX_EXPERTS, MAX_LAYERS = 4096, 512
ROLES = ("user", "assistant")
STATUSES = ("complete", "interrupted", "error")
KINDS = ("image", "audio", "video", "model3d")
SHA256 = re.compile(r"[0-9a-f]{64}")
SERVER_ONLY_META = ("overlays",)  # turn meta that names files on the machine that made it


@dataclass(frozen=True)
class PlannedTurn:
    role: str
    content: str
    status: str
    created_at: float | None
    meta: dict
    parent: int | None  # index of an earlier PlannedTurn
    media: tuple[tuple[str, str, bool], ...]  # (sha256, name, spoken)


@dataclass
class Plan:
    title: str
    created_at: float | None
    settings: dict
    turns: list[PlannedTurn]
    head: int | None  # index of the turn shown
    media: dict[str, tuple[int, dict]] = field(default_factory=dict)  # sha256 -> (index in the file, entry)

    def used_media(self) -> list[str]:
        """The media files some turn refers to, in the file's order (others are not stored)."""
        used = {sha for t in self.turns for sha, _, _ in t.media}
        return [sha for sha in self.media if sha in used]


def plan(doc, models: Sequence[str] | None, notes: list[str]) -> Plan:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"This is not a conversation exported from this app (it has no \"format\": \"{FORMAT}\"). "
                         "Export a conversation as JSON and import that file.")
    version = doc.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise InputError(f"This export is format version {printable(str(version))[:20]}; this app reads version "
                         f"{VERSION}" + (" (it was made by a newer version of the app)" if newer else ""))
    title = " ".join(_text(doc.get("title", ""), "the title", 1000).split())[:120]
    media = _media(_list(doc.get("media", []), "media", MAX_MEDIA, "media files"))
    turns = _turns(_list(doc.get("turns"), "turns", MAX_TURNS, "turns"), media)
    head = _head(doc, turns)
    return Plan(title, _time(doc.get("created_at"), "the conversation's created_at"),
                _settings(doc.get("settings", {}), models, notes), turns[1], head, media)


def _turns(items: list, media: dict) -> tuple[dict, list[PlannedTurn]]:
    """The turns in file order; each parent an earlier turn's id (so no cycle can exist)."""
    index: dict = {}  # the file's turn id -> position
    every = {_id(t.get("id")) for t in items if isinstance(t, dict) and _is_id(t.get("id"))}
    out: list[PlannedTurn] = []
    for i, t in enumerate(items):
        label = f"turn {i + 1}"
        if not isinstance(t, dict):
            raise InputError(f"{label} is {_kind(t)}, not an object")
        tid = t.get("id")
        if not _is_id(tid):
            raise InputError(f"{label}: its id must be a number or a short text, not {_kind(tid)}")
        tid = _id(tid)
        if tid in index:
            raise InputError(f"{label}: its id {printable(str(tid))[:40]} is used by turn {index[tid] + 1} too")
        parent = t.get("parent")
        if parent is not None:
            if not _is_id(parent):
                raise InputError(f"{label}: its parent must be a turn id or null, not {_kind(parent)}")
            parent = _id(parent)
            if parent not in index:
                where = "itself" if parent == tid else "a later turn" if parent in every else "no turn in this file"
                raise InputError(f"{label}: its parent {printable(str(parent))[:40]} is {where}; a turn must follow "
                                 "an earlier turn of the file (parents come before their replies)")
        role = t.get("role")
        if role not in ROLES:
            raise InputError(f"{label}: its role must be one of {', '.join(ROLES)}, not {_shown(role)}")
        status = t.get("status", "complete")
        if status not in STATUSES:
            raise InputError(f"{label}: its status must be one of {', '.join(STATUSES)}, not {_shown(status)}")
        refs = []
        for j, ref in enumerate(_list(t.get("media", []), f"{label}'s media", MAX_TURN_MEDIA, "files")):
            where = f"{label}'s media file {j + 1}"
            if not isinstance(ref, dict) or ref.get("sha256") not in media:
                raise InputError(f"{where} refers to no media file of this export (by its sha256)")
            spoken = ref.get("spoken", False)
            if not isinstance(spoken, bool):
                raise InputError(f"{where}: 'spoken' must be true or false")
            sha = ref["sha256"]
            refs.append((sha, _name(ref.get("name", media[sha][1]["name"]), where), spoken))
        index[tid] = i
        out.append(PlannedTurn(role, _text(t.get("content"), f"{label}'s content", MAX_CONTENT), status,
                               _time(t.get("created_at"), f"{label}'s created_at"),
                               _meta(t.get("meta", {}), label), None if parent is None else index[parent],
                               tuple(refs)))
    return index, out


def _head(doc: dict, turns: tuple[dict, list]) -> int | None:
    index, planned = turns
    head = doc.get("head")
    if not planned:
        return None
    if head is None:
        return len(planned) - 1
    if not _is_id(head) or _id(head) not in index:
        raise InputError(f"The shown turn ('head': {_shown(head)}) is not a turn of this file")
    return index[_id(head)]


def _media(items: list) -> dict[str, tuple[int, dict]]:
    out: dict[str, tuple[int, dict]] = {}
    for i, m in enumerate(items):
        label = f"media file {i + 1}"
        if not isinstance(m, dict):
            raise InputError(f"{label} is {_kind(m)}, not an object")
        name = _name(m.get("name"), label)
        label = f"{label} ({printable(name)})"
        sha = m.get("sha256")
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise InputError(f"{label}: its sha256 must be 64 lowercase hex digits")
        if sha in out:
            raise InputError(f"{label} is media file {out[sha][0] + 1} again (the same sha256)")
        if m.get("kind") not in KINDS:
            raise InputError(f"{label}: its kind must be one of {', '.join(KINDS)}, not {_shown(m.get('kind'))}")
        if not isinstance(m.get("data"), str):
            raise InputError(f"{label}: its data must be the file's bytes as base64 text")
        out[sha] = (i, {"name": name, "kind": m["kind"], "data": m["data"]})
    return out


def _settings(value, models: Sequence[str] | None, notes: list[str]) -> dict:
    """The conversation's instructions, model and temperature (other plain values kept)."""
    if not isinstance(value, dict):
        raise InputError(f"The settings must be an object, not {_kind(value)}")
    out = {}
    for key, v in value.items():
        what = f"The setting {printable(str(key))[:40]}"
        if key == "instructions":
            out[key] = _text(v, "The instructions", 20_000)
        elif key == "model":
            v = _text(v, "The model setting", 200)
            if v and models is not None and v not in models:
                notes.append(f"Its model \u201c{printable(v)}\u201d is not installed here: it uses the default model.")
                continue
            out[key] = v
        elif key == "temperature":
            if not _number(v) or not 0 <= v <= 2:
                raise InputError(f"The temperature setting must be a number from 0 to 2, not {_shown(v)}")
            out[key] = v
        elif len(str(key)) > 64 or not (v is None or isinstance(v, bool) or _number(v)
                                        or (isinstance(v, str) and len(v) <= 1000)):
            raise InputError(f"{what} must be a short plain value")
        else:
            out[key] = v
    return out


def _meta(meta, label: str) -> dict:
    """A turn's meta: the keys the app reads back checked for shape, files on the machine
    that exported it dropped, anything else kept as it is (plain JSON)."""
    if not isinstance(meta, dict):
        raise InputError(f"{label}: its meta must be an object, not {_kind(meta)}")
    meta = {k: v for k, v in meta.items() if k not in SERVER_ONLY_META}
    where = f"{label}'s meta"
    if "error" in meta:
        _text(meta["error"], f"{where} 'error'", 10_000)
    if "model" in meta:
        _text(meta["model"], f"{where} 'model'", 200)
    tool = meta.get("tool")
    if tool is not None and not (isinstance(tool, dict) and isinstance(tool.get("name"), str)
                                 and isinstance(tool.get("arguments", {}), dict)):
        raise InputError(f"{where} 'tool' must be an object with a name and arguments")
    for key in ("perception", "transcripts"):
        facts = meta.get(key)
        if facts is not None and not (isinstance(facts, dict) and all(isinstance(v, str) for v in facts.values())):
            raise InputError(f"{where} '{key}' must map file names to text")
    if meta.get("router_stats") is not None:
        _router_stats(meta["router_stats"], f"{where} 'router_stats'")
    return meta


def _router_stats(stats, where: str) -> None:
    """MoE routing as the Experts panel draws it: a grid of layers x experts, so both are bounded."""
    bad = InputError(f"{where} is not the routing of an answer (layers of per-expert counts)")
    if not isinstance(stats, dict) or not isinstance(stats.get("layers"), dict) or len(stats["layers"]) > MAX_LAYERS:
        raise bad
    experts, top_k = stats.get("num_experts"), stats.get("top_k")
    if not (_int(experts) and 1 <= experts <= MAX_EXPERTS and _int(top_k) and 1 <= top_k <= experts):
        raise bad
    for layer, mods in stats["layers"].items():
        if not (str(layer).isdigit() and len(str(layer)) < 6 and isinstance(mods, dict) and len(mods) <= 16):
            raise bad
        for m in mods.values():
            if isinstance(m, dict) and "counts" in m and not (
                    isinstance(m["counts"], list) and len(m["counts"]) == experts
                    and all(_number(c) for c in m["counts"]) and _int(m.get("tokens"))):
                raise bad
    cache = stats.get("cache")
    if cache is not None and not (isinstance(cache, dict) and all(
            _number(cache.get(k)) for k in ("hit_rate", "resident_experts", "bytes_moved"))
            and (cache.get("prefetch_accuracy") is None or _number(cache["prefetch_accuracy"]))):
        raise bad


# --- small checks -------------------------------------------------------------------------------

def _list(value, what: str, limit: int, unit: str) -> list:
    if not isinstance(value, list):
        raise InputError(f"'{what}' must be a list, not {_kind(value)}")
    if len(value) > limit:
        raise InputError(f"'{what}' has {len(value):,} {unit}; an import takes at most {limit:,}")
    return value


def _text(value, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be text, not {_kind(value)}")
    if len(value) > limit:
        raise InputError(f"{what} is {len(value):,} characters long; the limit is {limit:,}")
    return value


def _name(value, what: str) -> str:
    """A media file's name as the user sees it: a plain file name, no folders, no control characters."""
    name = _text(value, f"{what}'s name", 1000)
    name = re.sub(r"[\x00-\x1f\x7f]", "", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()[:255]
    if not name:
        raise InputError(f"{what} has no file name")
    return name


def _time(value, what: str) -> float | None:
    if value is None:
        return None
    if not _number(value) or value < 0:
        raise InputError(f"{what} must be a time in seconds, not {_shown(value)}")
    return float(value)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v) -> bool:
    return _int(v) or (isinstance(v, str) and 0 < len(v) <= 64)


def _id(v):
    return str(v)  # 7 and "7" name the same turn


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(v), "a number")


def _shown(v) -> str:
    return printable(repr(v))[:40]
