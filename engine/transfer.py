"""A conversation out of the store and back in: Markdown (.zip) and JSON export, JSON import.

Markdown is for reading: the branch shown, as `conversation.md` with its media files beside
it in one .zip, linked by relative paths. JSON is for moving a conversation between
machines: every branch (turns with their parents), the shown leaf, the settings, the title,
and each media file inline as base64. It is written as a stream, so a conversation with
large media never sits in memory as one string.

An imported file is hostile until proven otherwise: its size is bounded before it is read
and the number of JSON values before it is parsed; every field is checked by
`transfer_schema` (parents must be earlier turns of the same file, so the tree can have no
cycle); each media file must decode, match its sha256 and pass `engine.media.ingest` like
any upload. Only then is anything written, in one transaction with new ids; the media
files a failed import had written are removed again.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from engine.errors import InputError, refuse_lone_surrogates
from engine.media import MediaRecord, ingest
from engine.perception.base import printable
from engine.transfer_schema import FORMAT, MAX_VALUES, SERVER_ONLY_META, VERSION, Plan, plan


@dataclass(frozen=True)
class Imported:
    conversation_id: str
    turns: int
    media: int
    notes: tuple[str, ...] = ()  # what was left out, and why (a model not installed here)


def file_stem(title: str) -> str:
    """A conversation title as a download's file name."""
    stem = re.sub(r"[^\w\- ]+", "", title or "").strip()
    return " ".join(stem.split())[:60] or "conversation"


def _conversation(store, cid: str) -> dict:
    conv = store.get_conversation(cid) if cid else None
    if conv is None:
        raise InputError("There is no such conversation to export (deleted?): open one first.")
    return conv


def _present(rec: MediaRecord) -> bool:
    return Path(rec.path).is_file()


# --- JSON ---------------------------------------------------------------------------------------

def export_json(store, cid: str, folder: Path) -> Path:
    """Write the whole conversation (every branch) to folder/<title>.json."""
    conv = _conversation(store, cid)
    turns = store.tree(cid)
    media: dict[str, MediaRecord] = {}
    for turn in turns:
        for rec in turn.media:
            if _present(rec):
                media.setdefault(rec.sha256, rec)
    doc = {"format": FORMAT, "version": VERSION, "exported_at": time.time(), "title": conv["title"],
           "created_at": conv["created_at"], "head": store.head(cid), "settings": store.settings(cid),
           "turns": [{"id": t.id, "parent": t.parent_id, "role": t.role, "content": t.content, "status": t.status,
                      "created_at": t.created_at,
                      "meta": {k: v for k, v in t.meta.items() if k not in SERVER_ONLY_META},
                      "media": [{"sha256": m.sha256, "name": m.name, "spoken": m.spoken}
                                for m in t.media if m.sha256 in media]} for t in turns]}
    dest = Path(folder) / f"{file_stem(conv['title'])}.json"
    with _atomic(dest, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, ensure_ascii=False)[:-1] + ', "media": [')
        for i, rec in enumerate(media.values()):
            entry = {"sha256": rec.sha256, "name": rec.name, "kind": rec.kind, "mime": rec.mime, "size": rec.size}
            f.write(("," if i else "") + json.dumps(entry, ensure_ascii=False)[:-1] + ', "data": "')
            with open(rec.path, "rb") as src:
                while chunk := src.read(3 << 18):  # a multiple of 3: no padding inside the stream
                    f.write(base64.b64encode(chunk).decode("ascii"))
            f.write('"}')
        f.write("]}")
    return dest


def import_json(store, source: str | os.PathLike, max_bytes: int, models: Sequence[str] | None = None,
                name: str | None = None) -> Imported:
    """Add the conversation in an exported JSON file as a new one (new ids, the same tree and
    shown branch). Raises InputError naming what is wrong; then nothing was added. `models`:
    the language models installed here (a setting naming another is dropped, with a note)."""
    source = Path(source)
    shown = printable(name or source.name)
    doc = _load(source, shown, max_bytes)
    notes: list[str] = []
    planned = plan(doc, models, notes)
    created: list[str] = []
    try:
        records = {sha: _ingest_media(store, planned, sha, max_bytes, created) for sha in planned.used_media()}
        cid = _insert(store, planned, records)
    except BaseException:
        _remove_unused(store, created)
        raise
    return Imported(cid, len(planned.turns), len(records), tuple(notes))


def _load(source: Path, shown: str, max_bytes: int):
    if not source.is_file():
        raise InputError(f"{shown}: file not found")
    size = source.stat().st_size
    if size > max_bytes:
        raise InputError(f"{shown} is {size / 1e6:.1f} MB; the limit for an import is {max_bytes / 1e6:.0f} MB "
                         "(raise it with --max-upload-mb)")
    data = source.read_bytes()
    # every JSON value but the last follows a separator or opens a container: counted before
    # parsing, so a file of a million tiny lists cannot take gigabytes to parse
    if sum(data.count(c) for c in (b",", b":", b"[", b"{")) > MAX_VALUES:
        raise InputError(f"{shown} holds too many values (more than {MAX_VALUES:,}) to be a conversation export")
    try:
        doc = json.loads(data)
        refuse_lone_surrogates(data, doc, f"{shown} is not a conversation export: it")
        return doc
    except RecursionError:
        raise InputError(f"{shown} is not a conversation export: its JSON is nested too deeply") from None
    except UnicodeDecodeError:
        raise InputError(f"{shown} is not a conversation export: it is not text (export a conversation as JSON "
                         "and import that file)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{shown} is not a conversation export: it is not valid JSON ({exc.msg} at line "
                         f"{exc.lineno}, column {exc.colno})") from None
    except InputError:
        raise
    except ValueError as exc:  # a number of over 4300 digits (Python's int limit), ...
        raise InputError(f"{shown} is not a conversation export: {str(exc)[:120]}") from None


def _ingest_media(store, planned: Plan, sha: str, max_bytes: int, created: list[str]) -> MediaRecord:
    """Decode one media entry, check it against its sha256, and store it through `ingest`
    (validated like an upload). Paths this wrote are appended to `created`."""
    index, entry = planned.media[sha]
    label = f"media file {index + 1} ({printable(entry['name'])})"
    try:
        raw = base64.b64decode(entry["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{label}: its data is not valid base64") from None
    if hashlib.sha256(raw).hexdigest() != sha:
        raise InputError(f"{label}: its data does not match its sha256 (the file was changed or damaged)")
    before = {str(p) for p in (store.media_dir / sha[:2]).glob(f"{sha}.*")}
    with tempfile.TemporaryDirectory(prefix="omni-import-") as tmp:
        path = Path(tmp) / "media"
        path.write_bytes(raw)
        del raw
        try:
            rec = ingest(path, store.media_dir, max_bytes, entry["name"])
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from None
    if rec.path not in before:
        created.append(rec.path)
    if rec.kind != entry["kind"]:
        raise InputError(f"{label} is said to be {entry['kind']} but its content is {rec.kind}")
    return rec


def _insert(store, planned: Plan, records: dict[str, MediaRecord]) -> str:
    """Everything in one transaction: the conversation, its turns parent first, their media."""
    cid, now = uuid.uuid4().hex[:12], time.time()
    with store._transaction() as db:
        db.execute("INSERT INTO conversations (id, title, created_at, updated_at, settings) VALUES (?, ?, ?, ?, ?)",
                   (cid, planned.title, planned.created_at or now, now, json.dumps(planned.settings)))
        ids: list[int] = []
        for turn in planned.turns:
            turn_id = db.execute(
                "INSERT INTO turns (conversation_id, role, content, status, meta, created_at, parent_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cid, turn.role, turn.content, turn.status, json.dumps(turn.meta), turn.created_at or now,
                 None if turn.parent is None else ids[turn.parent])).lastrowid
            ids.append(int(turn_id))
            for pos, (sha, name, spoken) in enumerate(turn.media):
                rec = records[sha]
                db.execute("INSERT OR IGNORE INTO media VALUES (?, ?, ?, ?, ?, ?)",
                           (rec.sha256, rec.kind, rec.mime, rec.path, rec.size, json.dumps(rec.meta)))
                db.execute("INSERT INTO turn_media VALUES (?, ?, ?, ?, ?)", (turn_id, sha, name, pos, int(spoken)))
        db.execute("UPDATE conversations SET head_id = ? WHERE id = ?",
                   (ids[planned.head] if planned.head is not None else None, cid))
    return cid


def _remove_unused(store, paths: list[str]) -> None:
    """Remove media files a failed import wrote, unless a stored record uses them by now."""
    with store._lock:
        for path in paths:
            sha = Path(path).name.split(".")[0]
            if not store._db.execute("SELECT 1 FROM media WHERE sha256 = ?", (sha,)).fetchone():
                Path(path).unlink(missing_ok=True)


# --- Markdown -----------------------------------------------------------------------------------

def export_markdown(store, cid: str, folder: Path) -> Path:
    """Write the branch shown to folder/<title>.zip: conversation.md and its media beside it."""
    conv = _conversation(store, cid)
    title = conv["title"] or "New chat"
    files: dict[str, tuple[str, str]] = {}  # sha256 -> (path, name in the zip)
    taken = {"conversation.md"}
    lines = [f"# {_md_line(title)}", "",
             f"*Exported from Omni assistant on {time.strftime('%Y-%m-%d %H:%M')}: the branch shown "
             "(the JSON export keeps every branch).*"]
    instructions = store.settings(cid).get("instructions")
    if isinstance(instructions, str) and instructions.strip():
        lines += ["", "**Instructions for this conversation:**", "",
                  *("> " + line for line in instructions.strip().splitlines())]
    for turn in store.turns(cid):
        lines += ["", f"### {'You' if turn.role == 'user' else 'Assistant'}", ""]
        for rec in turn.media:
            if not _present(rec):
                lines.append(f"*({_md_line(rec.name)}: the file is missing from this machine)*")
                continue
            if rec.sha256 not in files:
                files[rec.sha256] = (rec.path, _unique(_zip_name(rec), taken))
            target, alt = quote(files[rec.sha256][1]), _md_line(rec.name).replace("[", "(").replace("]", ")")
            lines.append(f"![{alt}]({target})" if rec.kind == "image" else f"[{alt}]({target})")
            lines.append("")
        text = turn.content
        if turn.status == "interrupted":
            text += "\n\n*(interrupted)*"
        if turn.meta.get("error") and str(turn.meta["error"]) not in text:
            text += f"\n\n> ⚠️ {turn.meta['error']}"
        if text:
            lines.append(text)
    dest = Path(folder) / f"{file_stem(conv['title'])}.zip"
    with _atomic(dest, "wb") as f, zipfile.ZipFile(f, "w") as z:
        z.writestr("conversation.md", "\n".join(lines).rstrip() + "\n", compress_type=zipfile.ZIP_DEFLATED)
        for path, arcname in files.values():  # (media are compressed already)
            z.write(path, arcname, compress_type=zipfile.ZIP_STORED)
    return dest


def _md_line(text: str) -> str:
    return " ".join(str(text).split())


def _zip_name(rec: MediaRecord) -> str:
    """The user's file name, made safe as a zip member (no folders, no leading dots), with the
    stored file's extension when it has none."""
    name = re.sub(r"[^\w.\- ]+", "_", Path(rec.name.replace("\\", "/")).name).strip(" .")[:100]
    stem, ext = os.path.splitext(name)
    return f"{stem or rec.sha256[:12]}{ext or Path(rec.path).suffix}"


def _unique(name: str, taken: set[str]) -> str:
    stem, ext = os.path.splitext(name)
    n, out = 1, name
    while out.lower() in taken:
        n += 1
        out = f"{stem}-{n}{ext}"
    taken.add(out.lower())
    return out


class _atomic:
    """Open `dest` for writing through a temporary file beside it, renamed into place only
    when the block ends without an error."""

    def __init__(self, dest: Path, mode: str, **kwargs) -> None:
        self.dest, self.mode, self.kwargs = Path(dest), mode, kwargs

    def __enter__(self):
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.dest.parent, suffix=".part")
        self.file = os.fdopen(fd, self.mode, **self.kwargs)
        return self.file

    def __exit__(self, kind, exc, tb) -> None:
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.dest)
        else:
            os.unlink(self.tmp)
