"""The schema's tables as both backends hold them, for code that works below the contract.

The transfer tool (migrate, verify, backup) reads and writes raw rows of every table;
each backend's ``rows`` module does the driver work and this module says what there
is: each moved table's key and column kinds (:class:`TableSpec`, in copy order,
parents first), which rows point at which, which tables are never moved, the integrity
queries (the same SQL on both backends), and the stored forms both backends share —
JSON as compact sorted text (:func:`canonical_json`), the ready/pending status of a
source (:data:`SOURCE_STATUS_SQL`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Row = tuple[Any, ...]

# Column kinds.
TEXT = "text"  # required text
TEXT_OPT = "text?"  # optional text
ROW_ID = "rowid"  # 1 .. 2**63-1, required
SNOWFLAKE = "snowflake"  # Discord id 0 .. 2**63-1, required
SNOWFLAKE_OPT = "snowflake?"
INT32 = "int32"  # required, PostgreSQL INT
TIME = "time"  # required timestamp
JSON_OBJ = "json"  # required JSON object (metadata)
VECTOR = "vector"  # required float32 vector
VECTOR_OPT = "vector?"
DAY = "day"  # required calendar day (UTC), canonical ``date``
COUNT = "count"  # required non-negative 64-bit counter


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A table the transfer moves: its key, its columns and their kinds.

    ``large`` tables have integer keys and are copied in key-ordered batches that a
    rerun resumes after the target's highest key; the others are small, read whole,
    and a rerun skips the keys the target already holds.
    """

    name: str
    key: str
    columns: tuple[tuple[str, str], ...]
    large: bool
    names: tuple[str, ...] = field(init=False)
    key_index: int = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(c for c, _ in self.columns)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "key_index", names.index(self.key))


META = TableSpec("kotonoha_meta", "key", (("key", TEXT), ("value", TEXT)), large=False)
SESSIONS = TableSpec(
    "sessions",
    "session_key",
    (
        ("session_key", TEXT),
        ("session_type", TEXT),
        ("status", TEXT),
        ("guild_id", SNOWFLAKE_OPT),
        ("channel_id", SNOWFLAKE_OPT),
        ("thread_id", SNOWFLAKE_OPT),
        ("user_id", SNOWFLAKE_OPT),
        ("version", INT32),
        ("message_count", INT32),
        ("last_archived_message_index", INT32),
        ("created_at", TIME),
        ("last_active_at", TIME),
    ),
    large=False,
)
MESSAGES = TableSpec(
    "messages",
    "id",
    (
        ("id", ROW_ID),
        ("session_key", TEXT),
        ("seq", INT32),
        ("role", TEXT),
        ("content", TEXT),
        ("author_id", SNOWFLAKE_OPT),
        ("author_name", TEXT_OPT),
        ("discord_message_id", SNOWFLAKE_OPT),
        ("created_at", TIME),
        ("channel_id", SNOWFLAKE_OPT),
        ("turn_id", SNOWFLAKE_OPT),
    ),
    large=True,
)
MESSAGE_REFS = TableSpec(
    "message_refs",
    "discord_message_id",
    (("discord_message_id", SNOWFLAKE), ("message_id", ROW_ID), ("channel_id", SNOWFLAKE)),
    large=True,
)
SOURCES = TableSpec(
    "knowledge_sources",
    "id",
    (
        ("id", ROW_ID),
        ("guild_id", SNOWFLAKE),
        ("channel_id", SNOWFLAKE_OPT),
        ("source_type", TEXT),
        ("uri", TEXT),
        ("title", TEXT),
        ("content_hash", TEXT),
        ("status", TEXT),
        ("metadata", JSON_OBJ),
        ("session_key", TEXT_OPT),
        ("created_at", TIME),
        ("updated_at", TIME),
    ),
    large=False,
)
CHUNKS = TableSpec(
    "knowledge_chunks",
    "id",
    (
        ("id", ROW_ID),
        ("source_id", ROW_ID),
        ("guild_id", SNOWFLAKE),
        ("channel_id", SNOWFLAKE_OPT),
        ("chunk_index", INT32),
        ("chunk_key", TEXT),
        ("content", TEXT),
        ("search_text", TEXT_OPT),
        ("metadata", JSON_OBJ),
        ("embedding", VECTOR_OPT),
        ("created_at", TIME),
    ),
    large=True,
)
CHUNK_MESSAGES = TableSpec(
    "chunk_messages",
    "id",
    (("id", ROW_ID), ("chunk_id", ROW_ID), ("message_id", ROW_ID)),
    large=True,
)
REEMBED = TableSpec(
    "reembed_vectors", "chunk_id", (("chunk_id", ROW_ID), ("embedding", VECTOR)), large=True
)
MEMORIES = TableSpec(
    "memories",
    "id",
    (
        ("id", ROW_ID),
        ("guild_id", SNOWFLAKE_OPT),
        ("user_id", SNOWFLAKE),
        ("content", TEXT),
        ("created_at", TIME),
    ),
    large=True,
)
USAGE = TableSpec(
    "llm_usage",
    "id",
    (
        ("id", ROW_ID),
        ("day", DAY),
        ("guild_id", SNOWFLAKE),
        ("user_id", SNOWFLAKE),
        ("model", TEXT),
        ("calls", COUNT),
        ("input_tokens", COUNT),
        ("output_tokens", COUNT),
    ),
    large=True,
)

#: Copy order (parents before children).
TABLES: tuple[TableSpec, ...] = (
    META,
    SESSIONS,
    MESSAGES,
    MESSAGE_REFS,
    SOURCES,
    CHUNKS,
    CHUNK_MESSAGES,
    REEMBED,
    MEMORIES,
    USAGE,
)
#: The tables whose rows point at rows of another large table, and which ones: a
#: child row whose parent was not moved is rejected (never written, never dropped).
PARENTS: dict[str, tuple[str, ...]] = {
    "message_refs": ("messages",),
    "chunk_messages": ("knowledge_chunks", "messages"),
    "reembed_vectors": ("knowledge_chunks",),
}
#: Schema tables that are never moved: short-lived locks of the running bot's jobs,
#: meaningless in another database (a wipe empties them).
TRANSIENT_TABLES: tuple[str, ...] = ("job_leases",)
TABLE_BY_NAME = {t.name: t for t in TABLES}

#: Rows that point nowhere or disagree with their parent, by what is wrong (the same
#: SQL on both backends; every count is 0 in a sound database).
INTEGRITY_CHECKS: dict[str, str] = {
    "messages without a session": (
        "SELECT count(*) FROM messages m WHERE NOT EXISTS"
        " (SELECT 1 FROM sessions s WHERE s.session_key = m.session_key)"
    ),
    "chunks without a source": (
        "SELECT count(*) FROM knowledge_chunks c WHERE NOT EXISTS"
        " (SELECT 1 FROM knowledge_sources s WHERE s.id = c.source_id)"
    ),
    "chunks in another guild than their source": (
        "SELECT count(*) FROM knowledge_chunks c JOIN knowledge_sources s"
        " ON s.id = c.source_id WHERE s.guild_id <> c.guild_id"
    ),
    "re-embed vectors without a chunk": (
        "SELECT count(*) FROM reembed_vectors r WHERE NOT EXISTS"
        " (SELECT 1 FROM knowledge_chunks c WHERE c.id = r.chunk_id)"
    ),
    "sessions whose message_count is wrong": (
        "SELECT count(*) FROM sessions s WHERE s.message_count <>"
        " (SELECT count(*) FROM messages m WHERE m.session_key = s.session_key)"
    ),
    "reply links without a message": (
        "SELECT count(*) FROM message_refs r WHERE NOT EXISTS"
        " (SELECT 1 FROM messages m WHERE m.id = r.message_id)"
    ),
    "provenance rows without a chunk or message": (
        "SELECT count(*) FROM chunk_messages p WHERE NOT EXISTS"
        " (SELECT 1 FROM knowledge_chunks c WHERE c.id = p.chunk_id) OR NOT EXISTS"
        " (SELECT 1 FROM messages m WHERE m.id = p.message_id)"
    ),
    "provenance across sessions of another guild": (
        "SELECT count(*) FROM chunk_messages p JOIN knowledge_chunks c ON c.id = p.chunk_id"
        " JOIN messages m ON m.id = p.message_id JOIN sessions s"
        " ON s.session_key = m.session_key WHERE s.guild_id IS NULL OR s.guild_id <> c.guild_id"
    ),
}

#: Tables whose ``id`` comes from a sequence (SQLite AUTOINCREMENT, PostgreSQL identity):
#: after a move their high-water mark is carried over, so no id is ever handed out twice.
SEQUENCED: tuple[str, ...] = (
    MESSAGES.name,
    SOURCES.name,
    CHUNKS.name,
    CHUNK_MESSAGES.name,
    MEMORIES.name,
    USAGE.name,
)

#: A source is 'pending' while one of its chunks has no vector, else 'ready' (the rule of
#: :func:`kotonoha_bot.db.checks.source_status` in SQL); ``{source}`` is the id expression.
SOURCE_STATUS_SQL = (
    "CASE WHEN EXISTS (SELECT 1 FROM knowledge_chunks c WHERE c.source_id = {source}"
    " AND c.embedding IS NULL) THEN 'pending' ELSE 'ready' END"
)


def canonical_json(value: Any) -> str:
    """The JSON text both backends store (compact, sorted keys, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


class RawText(bytes):
    """A SQLite TEXT value fetched undecoded (``text_factory``), so bad UTF-8 is ours to report."""

    __slots__ = ()
