"""Full-text search over conversations: their titles and every turn of every branch.

Two SQLite FTS5 tables shadow the store's own: `turn_search` (a row per turn, its rowid the
turn's id) and `title_search` (a row per conversation). Triggers on `turns` and
`conversations` keep them current, so no writer has to remember to index; deleting a
conversation cascades to its turns, whose delete trigger drops their rows. `install` adds
the tables and triggers to a database (once: an existing one is backfilled in the same
transaction).

The user's query is free text, never FTS5 syntax: it is cut into words, each quoted, the
last one a prefix ("ligh" finds "lighthouse"), so `AND`, quotes, `*`, `:` or an unbalanced
parenthesis are just characters. Snippets come back marked with two private-use characters;
`marked_html` escapes the text and only then turns the markers into <mark>.
"""
from __future__ import annotations

import html
import re
import sqlite3
from dataclasses import dataclass

from engine.errors import Unavailable

OPEN, CLOSE = "\ue000", "\ue001"  # snippet markers (private use: never typed, escaped away below)
MAX_QUERY = 256  # characters of the query that are read
MAX_WORDS = 12
MAX_HITS = 2000  # best-ranked turns looked at per search (a word in every turn still costs this much)
TOKENIZER = "unicode61 remove_diacritics 2"  # case- and accent-insensitive: "cafe" finds "Café"

TABLES = (
    f'CREATE VIRTUAL TABLE turn_search USING fts5(body, conversation_id UNINDEXED, tokenize="{TOKENIZER}")',
    f'CREATE VIRTUAL TABLE title_search USING fts5(title, conversation_id UNINDEXED, tokenize="{TOKENIZER}")',
    "INSERT INTO turn_search(rowid, body, conversation_id) SELECT id, content, conversation_id FROM turns",
    "INSERT INTO title_search(title, conversation_id) SELECT title, id FROM conversations",
)
TURN_ROW = "INSERT INTO turn_search(rowid, body, conversation_id) VALUES (new.id, new.content, new.conversation_id);"
TITLE_ROW = "INSERT INTO title_search(title, conversation_id) VALUES (new.title, new.id);"
TRIGGERS = {
    "turn_search_insert": f"AFTER INSERT ON turns BEGIN {TURN_ROW} END",
    "turn_search_update": "AFTER UPDATE OF content, conversation_id ON turns BEGIN "
                          f"DELETE FROM turn_search WHERE rowid = old.id; {TURN_ROW} END",
    "turn_search_delete": "AFTER DELETE ON turns BEGIN DELETE FROM turn_search WHERE rowid = old.id; END",
    "title_search_insert": f"AFTER INSERT ON conversations BEGIN {TITLE_ROW} END",
    "title_search_update": "AFTER UPDATE OF title ON conversations BEGIN "
                           f"DELETE FROM title_search WHERE conversation_id = old.id; {TITLE_ROW} END",
    "title_search_delete": "AFTER DELETE ON conversations BEGIN "
                           "DELETE FROM title_search WHERE conversation_id = old.id; END",
}
# the best-ranked turn of each conversation that matches (window over the top MAX_HITS)
TURN_HITS = f"""
WITH hits AS (SELECT conversation_id AS cid, rowid AS turn_id, rank AS score,
                     snippet(turn_search, 0, '{OPEN}', '{CLOSE}', '…', 12) AS snip
              FROM turn_search WHERE turn_search MATCH ? ORDER BY rank LIMIT {MAX_HITS}),
     best AS (SELECT *, row_number() OVER (PARTITION BY cid ORDER BY score) AS n FROM hits)
SELECT best.cid, best.turn_id, best.score, best.snip FROM best JOIN conversations c ON c.id = best.cid
WHERE n = 1 ORDER BY score LIMIT ?
"""
TITLE_HITS = f"""
SELECT s.conversation_id AS cid, highlight(title_search, 0, '{OPEN}', '{CLOSE}') AS marked, rank AS score
FROM title_search s JOIN conversations c ON c.id = s.conversation_id
WHERE title_search MATCH ? ORDER BY rank LIMIT ?
"""
WORD = re.compile(r"[^\W_]+")  # letters and digits: what the unicode61 tokenizer keeps


@dataclass(frozen=True)
class Hit:
    conversation_id: str
    title: str  # plain text
    title_html: str  # escaped, the matching words in <mark>
    snippet_html: str  # a matching passage of a turn, escaped and marked ("" when only the title matched)
    turn_id: int | None  # the turn the snippet is from (on whichever branch it is)
    updated_at: float


def install(db: sqlite3.Connection) -> bool:
    """Add the search tables and their triggers to the store's database (idempotent). An
    existing database is indexed once, in the same transaction that creates the tables.
    False when this SQLite has no FTS5 (search then says so; nothing else changes)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'turn_search'").fetchone():
            for statement in TABLES:
                db.execute(statement)
        for name, body in TRIGGERS.items():
            db.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {body}")
        db.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        db.execute("ROLLBACK")
        if "fts5" in str(exc):
            return False
        raise
    return True


def available(store) -> bool:
    return bool(store._query("SELECT 1 FROM sqlite_master WHERE name = 'turn_search'"))


def fts_query(text: str) -> str | None:
    """Free text -> an FTS5 query of quoted words (all must occur), the last one a prefix
    unless the text ends with a space. None when there is no word to look for."""
    text = (text or "")[:MAX_QUERY]
    words = WORD.findall(text)
    if not words:
        return None
    quoted = [f'"{w}"' for w in words[:MAX_WORDS]]  # (a word has no quote in it: WORD keeps letters and digits)
    if len(words) <= MAX_WORDS and WORD.match(text[-1]):  # the text ends inside its last word: still typed
        quoted[-1] += "*"
    return " ".join(quoted)


def search(store, query: str, limit: int = 20) -> list[Hit]:
    """Conversations whose title or any turn matches `query`, the best first: title matches,
    then by the rank of their best-matching turn."""
    match = fts_query(query)
    if match is None:
        return []
    if not available(store):
        raise Unavailable("this Python's SQLite was built without FTS5, so conversations cannot be searched",
                          "use a Python whose sqlite3 module has FTS5 (python.org and Debian builds do)")
    limit = max(1, min(int(limit), 200))
    titles = {r["cid"]: r for r in store._query(TITLE_HITS, (match, limit))}
    turns = {r["cid"]: r for r in store._query(TURN_HITS, (match, limit))}
    order = sorted(set(titles) | set(turns),
                   key=lambda c: (c not in titles, titles[c]["score"] if c in titles else turns[c]["score"]))[:limit]
    if not order:
        return []
    rows = store._query(f"SELECT id, title, updated_at FROM conversations WHERE id IN ({','.join('?' * len(order))})",
                        tuple(order))
    convs = {r["id"]: r for r in rows}
    hits = []
    for cid in order:
        if cid not in convs:  # deleted meanwhile
            continue
        title = convs[cid]["title"]
        hits.append(Hit(cid, title, marked_html(titles[cid]["marked"]) if cid in titles else html.escape(title),
                        marked_html(turns[cid]["snip"]) if cid in turns else "",
                        turns[cid]["turn_id"] if cid in turns else None, convs[cid]["updated_at"]))
    return hits


def marked_html(text: str) -> str:
    """Snippet text with OPEN/CLOSE markers -> HTML: everything escaped, the marked words in
    <mark> (balanced, whatever markers the stored text itself happens to contain)."""
    out, open_ = [], False
    for part in re.split(f"([{OPEN}{CLOSE}])", text or ""):
        if part == OPEN:
            if not open_:
                out.append("<mark>")
            open_ = True
        elif part == CLOSE:
            if open_:
                out.append("</mark>")
            open_ = False
        else:
            out.append(html.escape(part))
    if open_:
        out.append("</mark>")
    return "".join(out)
