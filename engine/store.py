"""Conversations, turns and media records in SQLite (WAL).

Each completed turn is committed on its own transaction, so killing the
process (even SIGKILL) loses nothing already answered, and a crash mid-write
leaves the database consistent. Media files live beside it by content hash.

A conversation is a tree of turns: each turn names its parent (the turn it
follows; NULL for a first message), so a regenerated answer is a sibling of the
one it replaces and an edited message a sibling of the original. The
conversation's `head_id` is the leaf shown; `turns(cid)` is the branch from the
root to it, which is all the model and the page read.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engine.media import MediaRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    head_id INTEGER,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    parent_id INTEGER REFERENCES turns(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns(conversation_id, id);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    previous_id TEXT,
    messages TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS media (
    sha256 TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    mime TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS turn_media (
    turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL REFERENCES media(sha256),
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    spoken INTEGER NOT NULL DEFAULT 0
);
"""
# a database made before turn_media had `spoken`: the column, and the spoken files of then
# (known only by the names they were stored under) marked
SPOKEN_COLUMN = """
ALTER TABLE turn_media ADD COLUMN spoken INTEGER NOT NULL DEFAULT 0;
UPDATE turn_media SET spoken = 1 WHERE name IN ('answer.wav', 'voice message.wav');
"""
# a database made before conversations were trees: each turn follows the one stored before it in
# its conversation, and the last one is shown
TREE_COLUMNS = """
BEGIN IMMEDIATE;
ALTER TABLE turns ADD COLUMN parent_id INTEGER REFERENCES turns(id) ON DELETE CASCADE;
ALTER TABLE conversations ADD COLUMN head_id INTEGER;
ALTER TABLE conversations ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
UPDATE turns SET parent_id = (SELECT MAX(p.id) FROM turns p
                              WHERE p.conversation_id = turns.conversation_id AND p.id < turns.id);
UPDATE conversations SET head_id = (SELECT MAX(t.id) FROM turns t WHERE t.conversation_id = conversations.id);
COMMIT;
"""
INDEXES = "CREATE INDEX IF NOT EXISTS turns_by_parent ON turns(parent_id);"
# the branch from the root to a turn (ids grow down a branch: a turn is stored after its parent)
BRANCH = """
WITH RECURSIVE branch(id) AS (SELECT ? UNION ALL SELECT t.parent_id FROM turns t JOIN branch b ON t.id = b.id
                              WHERE t.parent_id IS NOT NULL)
"""
HEAD = object()  # add_turn's default parent: the conversation's shown leaf


@dataclass(frozen=True)
class StoredTurn:
    id: int
    role: str  # user | assistant
    content: str
    status: str  # complete | interrupted | error
    created_at: float
    media: tuple[MediaRecord, ...] = ()
    meta: dict = field(default_factory=dict)
    parent_id: int | None = None


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.media_dir = self.data_dir / "media"
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data_dir / "conversations.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        self._db.execute("PRAGMA foreign_keys=ON")
        if "parent_id" not in self._columns("turns") and self._columns("turns"):
            self._db.executescript(TREE_COLUMNS)
        self._db.executescript(SCHEMA)
        if "spoken" not in self._columns("turn_media"):
            self._db.executescript(SPOKEN_COLUMN)
        self._db.executescript(INDEXES)
        from engine.search import install; install(self._db)  # full-text search, kept current by triggers

    def _columns(self, table: str) -> set[str]:
        return {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _tx(self, sql: str, params: tuple) -> None:
        with self._transaction() as db:
            db.execute(sql, params)

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # conversations
    def create_conversation(self, title: str = "") -> str:
        cid, now = uuid.uuid4().hex[:12], time.time()
        self._tx("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                 (cid, title, now, now))
        return cid

    def get_conversation(self, cid: str) -> dict | None:
        rows = self._query("SELECT * FROM conversations WHERE id = ?", (cid,))
        return dict(rows[0]) if rows else None

    def list_conversations(self) -> list[dict]:
        rows = self._query(
            "SELECT c.*, (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) AS turns "
            "FROM conversations c ORDER BY updated_at DESC")
        return [dict(r) for r in rows]

    def rename_conversation(self, cid: str, title: str) -> None:
        title = " ".join(title.split())[:120]
        if not title:
            raise ValueError("a conversation title cannot be empty")
        self._tx("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))

    def delete_conversation(self, cid: str) -> None:
        self._tx("DELETE FROM conversations WHERE id = ?", (cid,))

    # stored answers of the Responses API (/v1/responses with store: the messages this response
    # added, its input and output, and the response it followed)
    def save_response(self, rid: str, previous: str | None, messages: list[dict], body: dict) -> None:
        self._tx("INSERT INTO responses VALUES (?, ?, ?, ?, ?)",
                 (rid, previous, json.dumps(messages), json.dumps(body), time.time()))

    def get_response(self, rid: str) -> dict | None:
        rows = self._query("SELECT body FROM responses WHERE id = ?", (rid,))
        return json.loads(rows[0]["body"]) if rows else None

    def response_messages(self, rid: str, limit: int = 256) -> list[dict] | None:
        """The conversation up to and including response `rid`, following each one's previous
        (at most `limit` back); None when `rid` is not stored."""
        chain: list[list[dict]] = []
        while rid and len(chain) < limit:
            rows = self._query("SELECT previous_id, messages FROM responses WHERE id = ?", (rid,))
            if not rows:
                return None if not chain else [m for part in reversed(chain) for m in part]
            chain.append(json.loads(rows[0]["messages"]))
            rid = rows[0]["previous_id"]
        return [m for part in reversed(chain) for m in part]

    def delete_response(self, rid: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

    # per-conversation settings (the page's instructions, model and temperature)
    def settings(self, cid: str) -> dict:
        rows = self._query("SELECT settings FROM conversations WHERE id = ?", (cid,))
        return json.loads(rows[0]["settings"]) if rows else {}

    def set_settings(self, cid: str, settings: dict) -> None:
        self._tx("UPDATE conversations SET settings = ? WHERE id = ?", (json.dumps(settings), cid))

    # turns and media
    def add_turn(self, cid: str, role: str, content: str, status: str = "complete",
                 media: tuple[MediaRecord, ...] = (), meta: dict | None = None, parent=HEAD) -> int:
        """Store a turn after `parent` (by default the shown leaf; None: a first message) and show
        the branch it ends."""
        now = time.time()
        with self._transaction() as db:
            if parent is HEAD:
                parent = db.execute("SELECT head_id FROM conversations WHERE id = ?", (cid,)).fetchone()[0]
            turn_id = db.execute(
                "INSERT INTO turns (conversation_id, role, content, status, meta, created_at, parent_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cid, role, content, status, json.dumps(meta or {}), now, parent)).lastrowid
            db.execute("UPDATE conversations SET updated_at = ?, head_id = ? WHERE id = ?", (now, turn_id, cid))
            for pos, rec in enumerate(media):
                db.execute("INSERT OR IGNORE INTO media VALUES (?, ?, ?, ?, ?, ?)",
                           (rec.sha256, rec.kind, rec.mime, rec.path, rec.size, json.dumps(rec.meta)))
                db.execute("INSERT INTO turn_media VALUES (?, ?, ?, ?, ?)",
                           (turn_id, rec.sha256, rec.name, pos, int(rec.spoken)))
        return int(turn_id)

    def set_status(self, turn_id: int, status: str) -> None:
        self._tx("UPDATE turns SET status = ? WHERE id = ?", (status, turn_id))

    def head(self, cid: str) -> int | None:
        rows = self._query("SELECT head_id FROM conversations WHERE id = ?", (cid,))
        return rows[0]["head_id"] if rows else None

    def turns(self, cid: str, upto=HEAD) -> list[StoredTurn]:
        """The branch shown: root to the head; with `upto`, root to that turn (None: nothing)."""
        if upto is HEAD:
            upto = self.head(cid)
        if upto is None:
            return []
        return self._read(BRANCH + "SELECT t.* FROM turns t JOIN branch b ON t.id = b.id "
                          "WHERE t.conversation_id = ? ORDER BY t.id", (upto, cid))

    def tree(self, cid: str) -> list[StoredTurn]:
        """Every turn of the conversation, every branch, oldest first."""
        return self._read("SELECT * FROM turns WHERE conversation_id = ? ORDER BY id", (cid,))

    def turn(self, cid: str, turn_id: int) -> StoredTurn | None:
        found = self._read("SELECT * FROM turns WHERE conversation_id = ? AND id = ?", (cid, turn_id))
        return found[0] if found else None

    def alternatives(self, cid: str, upto=HEAD) -> dict[int, list[int]]:
        """For each turn of the shown branch (root to `upto`, as `turns`), its siblings (the turns
        that follow the same parent, itself included, oldest first): more than one where an
        answer was regenerated or a message edited."""
        head = self.head(cid) if upto is HEAD else upto
        if head is None:
            return {}
        rows = self._query(BRANCH + "SELECT b.id AS shown, s.id AS sibling FROM branch b JOIN turns t ON t.id = b.id "
                           "JOIN turns s ON s.conversation_id = t.conversation_id AND s.parent_id IS t.parent_id "
                           "WHERE t.conversation_id = ? ORDER BY s.id", (head, cid))
        out: dict[int, list[int]] = {}
        for r in rows:
            out.setdefault(r["shown"], []).append(r["sibling"])
        return out

    def show(self, cid: str, turn_id: int) -> None:
        """Show the branch through `turn_id`: down to the newest turn below it (where the user
        last was on that branch)."""
        with self._transaction() as db:
            leaf = db.execute(
                "WITH RECURSIVE below(id) AS (SELECT id FROM turns WHERE id = ? AND conversation_id = ? "
                "UNION ALL SELECT t.id FROM turns t JOIN below b ON t.parent_id = b.id) SELECT MAX(id) FROM below",
                (turn_id, cid)).fetchone()[0]
            if leaf is None:
                raise KeyError(f"no turn {turn_id} in conversation {cid}")
            db.execute("UPDATE conversations SET head_id = ? WHERE id = ?", (leaf, cid))

    def _read(self, sql: str, params: tuple) -> list[StoredTurn]:
        rows = self._query(sql, params)
        ids = [r["id"] for r in rows]
        by_turn: dict[int, list[MediaRecord]] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            media = self._query(
                "SELECT tm.turn_id, tm.name, tm.spoken, m.* FROM turn_media tm JOIN media m ON m.sha256 = tm.sha256 "
                f"WHERE tm.turn_id IN ({','.join('?' * len(part))}) ORDER BY tm.turn_id, tm.position", tuple(part))
            for m in media:
                by_turn.setdefault(m["turn_id"], []).append(
                    MediaRecord(m["sha256"], m["kind"], m["mime"], m["path"], m["size"], m["name"],
                                json.loads(m["meta"]), bool(m["spoken"])))
        return [StoredTurn(r["id"], r["role"], r["content"], r["status"], r["created_at"],
                           tuple(by_turn.get(r["id"], ())), json.loads(r["meta"]), r["parent_id"]) for r in rows]
