"""`kotonoha db migrate` / `verify`: whole databases moved between real SQLite files and a
real PostgreSQL, in both directions, with dirty rows, crashes and corrupt sources.

Data is written through the storage contract (so it is what the bot writes), except
the dirty rows, which are planted with raw sqlite3 the way old or broken tools would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database, sqlite_path_from_url
from kotonoha_bot.errors import ConfigError, MigrationError
from kotonoha_bot.models import (
    BackupRecord,
    ChatSession,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Memory,
    Message,
    UsageRecord,
)
from kotonoha_bot.transfer.copy import migrate
from kotonoha_bot.transfer.endpoints import table_counts
from kotonoha_bot.transfer.marker import migration_marker
from kotonoha_bot.transfer.reports import EXIT_QUARANTINED, MigrationReport
from kotonoha_bot.transfer.verify import verify
from tests.db.old_schema import OLD_SCHEMA_WRITERS

BIG = 1234567890123456789
DIM = 8
REPO = Path(__file__).resolve().parents[2]


def special_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit-ish vectors with the float32 values that round-trips get wrong."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    specials = np.array(
        [-0.0, 1.0e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 0.1, 1 / 3, 2.0**-126],
        dtype=np.float32,
    )
    for i in range(n):
        v[i, i % dim] = specials[i % len(specials)]
    v[np.abs(v).sum(axis=1) == 0, 0] = 1.0
    return v


async def fill(
    url: str,
    settings: Settings,
    *,
    sessions: int = 6,
    messages: int = 4,
    sources: int = 3,
    chunks: int = 5,
    dim: int = DIM,
    reembed: bool = False,
    people: bool = True,
) -> None:
    """A realistic database: Japanese and emoji, big snowflakes, metadata, vectors.

    With ``people`` (and at least two sessions) it also holds what follows Discord: the
    bot's reply parts, a conversation source whose chunks record their messages,
    memories in a guild and a DM, and usage rows.
    """
    t0 = datetime(2026, 1, 16, 9, 30, 15, 123456, tzinfo=UTC)
    async with open_database(url, settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("text-embedding-3-small", dim))
        for i in range(sessions):
            kind = ("mention", "thread", "eavesdrop", "dm")[i % 4]
            s = ChatSession(
                session_key=f"{kind}:{BIG + i}",
                session_type=kind,  # type: ignore[arg-type]
                guild_id=BIG if i % 2 else None,
                channel_id=BIG - i,
                thread_id=BIG + i if kind == "thread" else None,
                user_id=2**63 - 1 - i,
                created_at=t0,
                last_active_at=t0,
                status="archived" if i == 1 else "active",
                last_archived_message_index=1 if i == 1 else -1,
            )
            for j in range(messages):
                s.add_message(
                    Message(
                        "user" if j % 2 == 0 else "assistant",
                        f"こんにちは、ことのは！🌸 第{i}-{j}話\n改行と\ttab、'引用' \"quote\"",
                        t0 + timedelta(seconds=j, microseconds=j),
                        author_id=BIG + j if j % 2 == 0 else None,
                        author_name="さくら" if j % 2 == 0 else None,
                        discord_message_id=BIG + 1000 * i + j,
                        channel_id=BIG - i,
                        turn_id=BIG + 1000 * i + j - (j % 2),
                    )
                )
            await db.save_session(s)
            if people and s.guild_id is not None:
                await db.record_reply_parts(
                    s.session_key,
                    BIG + 1000 * i,
                    BIG - i,
                    [BIG + 500_000 + 10 * i + k for k in (0, 1)],
                )
        vectors = special_vectors(sources * chunks, dim)
        for s_i in range(sources):
            items = [
                KnowledgeChunk(
                    chunk_key=f"k{s_i}-{c}",
                    content=f"東京都の猫 {s_i}-{c} 🐈 naïve café",
                    chunk_index=c,
                    # The last chunk of the last source awaits its embedding.
                    embedding=None
                    if (s_i == sources - 1 and c == chunks - 1)
                    else vectors[s_i * chunks + c],
                    metadata={"heading": f"§{c}", "n": c, "f": 1.5, "big": 1e20, "ok": True},
                    channel_id=BIG + c if c % 2 else None,
                )
                for c in range(chunks)
            ]
            await db.save_source(
                KnowledgeSource(
                    guild_id=BIG + (s_i % 2),
                    uri=f"docs/ファイル{s_i}.md",
                    title=f"資料 {s_i}",
                    channel_id=BIG if s_i == 0 else None,
                    content_hash=f"sha256:{s_i:064d}",
                    metadata={"tags": ["a", "日本語"], "nested": {"x": None}},
                    source_type="document" if s_i % 2 == 0 else "conversation",
                    session_key=f"mention:{BIG}" if s_i % 2 else None,
                ),
                items,
            )
        if people and sessions >= 2:
            talk = await db.load_session(f"thread:{BIG + 1}")
            assert talk is not None and talk.guild_id == BIG
            conv = await db.ensure_source(
                KnowledgeSource(
                    guild_id=BIG,
                    uri=f"session:{talk.session_key}",
                    title="会話",
                    source_type="conversation",
                    session_key=talk.session_key,
                )
            )
            assert conv.source_id is not None
            await db.add_chunks(
                conv.source_id,
                [
                    KnowledgeChunk(
                        chunk_key=f"w{a}",
                        content="\n".join(m.content for m in talk.messages[a : b + 1]),
                        chunk_index=a,
                        metadata={"kind": "conversation", "first_index": a, "last_index": b},
                        message_ids=tuple(m.stored_id or 0 for m in talk.messages[a : b + 1]),
                    )
                    for a, b in ((0, 1), (1, 3))
                ],
            )
            await db.add_memory(Memory(2**63 - 2, "猫アレルギー 🐈", BIG), max_per_user=5)
            await db.add_memory(Memory(2**63 - 2, "DMだけの話\n改行", None), max_per_user=5)
            await db.add_memory(Memory(7, "ほかのサーバー", BIG + 1), max_per_user=5)
            day = date(2026, 1, 16)
            await db.record_usage(UsageRecord(day, "claude-x", BIG, 2**63 - 2, 2, 1200, 300))
            await db.record_usage(UsageRecord(day, "claude-x", 0, 7, 1, 10, 3))
            await db.record_usage(UsageRecord(date(2026, 2, 1), "gpt-y", BIG, 0, 1, 5, 1))
        if reembed:
            await db.begin_reembed(EmbeddingConfig("other-model", 4))
            todo = await db.reembed_todo(limit=3)
            await db.store_reembed(
                [
                    (p.chunk_id, np.array([1, 2, 3, 4], np.float32) * (k + 1))
                    for k, p in enumerate(todo)
                ]
            )


async def snapshot(url: str, settings: Settings) -> dict[str, Any]:
    """Everything observable through the contract (ids excluded), vectors as raw bytes."""
    async with open_database(url, settings=settings) as db:
        infos = await db.list_sessions()
        sessions = {}
        for info in infos:
            s = await db.load_session(info.session_key)
            assert s is not None
            sessions[s.session_key] = (
                s.session_type,
                s.status,
                s.guild_id,
                s.channel_id,
                s.thread_id,
                s.user_id,
                s.version,
                s.last_archived_message_index,
                s.created_at,
                s.last_active_at,
                [
                    (
                        m.role,
                        m.content,
                        m.timestamp,
                        m.author_id,
                        m.author_name,
                        m.discord_message_id,
                        m.channel_id,
                        m.turn_id,
                    )
                    for m in s.messages
                ],
            )
        sources = {}
        for src in await db.list_sources():
            assert src.source_id is not None
            listed = await db.list_chunks(src.source_id)
            origins = await db.chunk_origins([c.chunk_id or 0 for c in listed])
            chunks = [
                (
                    c.chunk_key,
                    c.content,
                    c.chunk_index,
                    c.metadata,
                    c.guild_id,
                    c.channel_id,
                    None if c.embedding is None else c.embedding.astype("<f4").tobytes(),
                    # Provenance by what it points at (ids are the database's own).
                    origins[c.chunk_id].links if c.chunk_id in origins else None,
                    len(c.message_ids),
                )
                for c in listed
            ]
            sources[(src.guild_id, src.uri)] = (
                src.title,
                src.source_type,
                src.channel_id,
                src.content_hash,
                src.status,
                src.metadata,
                src.session_key,
                src.created_at,
                src.updated_at,
                chunks,
            )
        guilds = {s[2] for s in sessions.values()} | {k[0] for k in sources} | {BIG, BIG + 1}
        memories = []
        for g in sorted(guilds - {None}):
            memories += await db.list_memories(guild_id=g)
        memories += await db.list_memories(guild_id=None, user_id=2**63 - 2)
        memories = [(m.guild_id, m.user_id, m.content, m.created_at) for m in memories]
        usage = await db.list_usage(since=date(2000, 1, 1), until=date(2100, 1, 1))
        return {
            "sessions": sessions,
            "sources": sources,
            "embedding": await db.get_embedding_config(),
            "reembed": await db.reembed_status(),
            "memories": memories,
            "usage": usage,
        }


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "kotonoha_bot", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen(
        [sys.executable, "-m", "kotonoha_bot", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def files(pattern: str, where: Path) -> list[Path]:
    return sorted(where.glob(pattern))


def check_clean(report: MigrationReport) -> None:
    assert report.verify is not None and report.verify.identical, report.verify
    assert report.quarantined == 0
    assert report.exit_code == 0


# --- the happy paths ------------------------------------------------------------------


async def test_round_trip_sqlite_postgres_sqlite_is_identical(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    src = await new_database_url("sqlite")
    pg = await new_database_url("postgres")
    back = await new_database_url("sqlite")
    await fill(src, settings, reembed=True)
    before = await snapshot(src, settings)

    there = await migrate(src, pg, settings=settings)
    check_clean(there)
    assert there.backup_path is not None and there.backup_path.is_file()
    assert there.backup_path.stat().st_mode & 0o777 == 0o600
    assert {t: r.moved for t, r in there.tables.items()} == {
        "kotonoha_meta": 4,  # embedding model + dimension, re-embed model + dimension
        "sessions": 6,
        "messages": 24,
        "message_refs": 6,  # two parts of one reply in each of the 3 guild sessions
        "knowledge_sources": 4,
        "knowledge_chunks": 17,
        "chunk_messages": 5,  # windows of 2 and 3 messages
        "reembed_vectors": 3,
        "memories": 3,
        "llm_usage": 3,
    }
    assert await migration_marker(pg, settings) is None
    on_pg = await snapshot(pg, settings)
    assert on_pg == before

    home = await migrate(pg, back, settings=settings)
    check_clean(home)
    assert home.backup_path is None  # a PostgreSQL source is read from one snapshot
    assert await snapshot(back, settings) == before

    # Independent of the migrations' own checks: the end equals the start.
    direct = await verify(src, back, settings=settings)
    assert direct.identical
    chunks = direct.tables["knowledge_chunks"]
    assert chunks.vectors_compared == 14 and chunks.matching == 17
    for name, rows in (("message_refs", 6), ("chunk_messages", 5), ("memories", 3)):
        assert direct.tables[name].matching == rows
    assert (
        direct.tables["llm_usage"].expected_checksum == direct.tables["llm_usage"].target_checksum
    )
    assert direct.tables["reembed_vectors"].vectors_compared == 3
    assert chunks.expected_checksum == chunks.target_checksum


async def test_vectors_are_bit_exact_on_postgres(new_database_url: Any, settings: Settings) -> None:
    """Read the vectors back with pgvector's text output, not through our own codec path."""
    import asyncpg

    src = await new_database_url("sqlite")
    pg = await new_database_url("postgres")
    await fill(src, settings, sessions=0, sources=2, chunks=8)
    check_clean(await migrate(src, pg, settings=settings))
    conn = sqlite3.connect(sqlite_path_from_url(src))
    want = {
        key: blob
        for key, blob in conn.execute(
            "SELECT chunk_key, embedding FROM knowledge_chunks WHERE embedding IS NOT NULL"
        )
    }
    conn.close()
    c = await asyncpg.connect(pg)
    try:
        rows = await c.fetch(
            "SELECT chunk_key, embedding::text AS t, vector_dims(embedding) AS d"
            " FROM knowledge_chunks WHERE embedding IS NOT NULL"
        )
        column_type = await c.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'knowledge_chunks'::regclass AND attname = 'embedding'"
        )
    finally:
        await c.close()
    assert column_type == f"vector({DIM})"
    assert len(rows) == len(want) == 15
    for r in rows:
        # float() keeps the sign of "-0" (json.loads would read an int 0).
        got = np.array([float(x) for x in r["t"].strip("[]").split(",")], dtype=np.float32)
        assert r["d"] == DIM
        assert got.astype("<f4").tobytes() == want[r["chunk_key"]], r["chunk_key"]


@pytest.mark.parametrize("target_kind", ["sqlite", "postgres"])
async def test_new_rows_after_migration_get_fresh_ids(
    target_kind: str, new_database_url: Any, settings: Settings
) -> None:
    """Sequences are advanced past every id the source ever used (deleted ones too)."""
    src = await new_database_url("sqlite")
    target = await new_database_url(target_kind)
    await fill(src, settings, sessions=2, sources=3)
    async with open_database(src, settings=settings) as db:
        last = (await db.list_sources())[-1]
        assert last.source_id is not None
        await db.delete_source(last.source_id)  # its id must never be handed out again
        await db.delete_session(f"thread:{BIG + 1}")
    check_clean(await migrate(src, target, settings=settings))
    async with open_database(target, settings=settings) as db:
        saved = await db.save_source(
            KnowledgeSource(guild_id=7, uri="after", title="after the move"),
            [KnowledgeChunk(chunk_key="x", content="新しい", embedding=np.ones(DIM, np.float32))],
        )
        assert saved.source_id == last.source_id + 1
        chunk = (await db.list_chunks(saved.source_id))[0]
        assert chunk.chunk_id is not None and chunk.chunk_id > 15
        s = ChatSession(session_key="dm:new", session_type="dm")
        s.add_message(Message("user", "after"))
        await db.save_session(s)
        loaded = await db.load_session(f"mention:{BIG}")
        assert loaded is not None
        loaded.add_message(Message("assistant", "appended after the move"))
        await db.save_session(loaded)
        assert [m.content for m in (await db.load_session(f"mention:{BIG}")).messages][-1] == (  # type: ignore[union-attr]
            "appended after the move"
        )


async def test_postgres_to_postgres_and_empty_databases(
    new_database_url: Any, settings: Settings
) -> None:
    empty = await new_database_url("postgres")
    async with open_database(empty, settings=settings):
        pass
    target = await new_database_url("postgres")
    report = await migrate(empty, target, settings=settings)
    check_clean(report)
    assert sum(t.moved for t in report.tables.values()) == 0
    assert await table_counts(target, settings) == dict.fromkeys(report.tables, 0)


# --- refusals --------------------------------------------------------------------------


async def test_target_must_be_empty(new_database_url: Any, settings: Settings) -> None:
    src = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    await fill(src, settings, sessions=1, sources=1)
    async with open_database(target, settings=settings) as db:
        s = ChatSession(session_key="dm:1", session_type="dm")
        await db.save_session(s)
    with pytest.raises(MigrationError, match="is not empty"):
        await migrate(src, target, settings=settings)
    assert (await table_counts(target, settings))["sessions"] == 1
    assert await migration_marker(target, settings) is None
    with pytest.raises(ConfigError, match="same database"):
        await migrate(src, src, settings=settings)
    with pytest.raises(MigrationError, match="does not exist"):
        await migrate("sqlite:///nowhere/missing.db", target, settings=settings)


async def test_target_with_another_embedding_model_is_refused(
    new_database_url: Any, settings: Settings
) -> None:
    src = await new_database_url("sqlite")
    target = await new_database_url("sqlite")
    await fill(src, settings, sessions=1, sources=1)
    async with open_database(target, settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("another", DIM))
    with pytest.raises(MigrationError, match="embedding_model"):
        await migrate(src, target, settings=settings)


def corrupt(path: Path) -> None:
    """Overwrite the b-tree pages after the first with garbage (the header stays valid)."""
    page = 4096
    data = bytearray(path.read_bytes())
    assert len(data) > 4 * page
    rng = np.random.default_rng(7)
    for start in range(page, len(data) - page, page * 2):
        data[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target_kind", ["sqlite", "postgres"])
async def test_corrupt_source_aborts_with_the_target_untouched(
    target_kind: str, new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    import asyncpg

    src = await new_database_url("sqlite")
    target = await new_database_url(target_kind)
    await fill(src, settings, sessions=20, messages=10, sources=4, chunks=10)
    path = sqlite_path_from_url(src)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    corrupt(path)

    with pytest.raises(MigrationError, match="integrity check") as info:
        await migrate(src, target, settings=settings)
    assert "nothing was written" in str(info.value)
    if target_kind == "sqlite":
        assert not sqlite_path_from_url(target).exists()
    else:
        c = await asyncpg.connect(target)
        try:
            tables = await c.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await c.close()
        assert tables == 0  # not even the schema was created
    assert not (tmp_path / "backups").exists()


# --- dirty rows in a current-schema file --------------------------------------------------


def plant_dirty_rows(path: Path) -> dict[str, str]:
    """Rows the contract would never write; returns key -> the reason we expect."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("PRAGMA ignore_check_constraints = ON")
    t = "2026-01-16T09:30:15.000000+00:00"
    conn.execute(
        "INSERT INTO sessions (session_key, session_type, status, version, message_count,"
        " created_at, last_active_at) VALUES ('group:1', 'group', 'active', 1, 0, ?, ?)",
        (t, t),
    )
    conn.execute(
        "INSERT INTO sessions (session_key, session_type, status, version, message_count,"
        " created_at, last_active_at) VALUES (?, 'dm', 'active', 1, 1, ?, ?)",
        ("dm:nul\x00key", t, t),
    )
    conn.execute(
        "INSERT INTO sessions (session_key, session_type, status, version, message_count,"
        " created_at, last_active_at) VALUES ('dm:badtime', 'dm', 'active', 1, 0, ?, ?)",
        ("yesterday", t),
    )
    msgs = [
        # id, session_key, seq, role, content
        (9001, "dm:nul\x00key", 0, "user", "NUL\x00inside"),
        (9002, f"mention:{BIG}", 100, "robot", "unknown role"),
        (9003, "nowhere:1", 0, "user", "orphan"),
        (9004, f"mention:{BIG}", 101, "user", sqlite3.Binary(b"\xff\xfe not utf-8")),
        (9005, f"mention:{BIG}", 102, "user", sqlite3.Binary("BLOB のテキスト".encode())),
    ]
    for mid, key, seq, role, content in msgs:
        conn.execute(
            "INSERT INTO messages (id, session_key, seq, role, content, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (mid, key, seq, role, content, t),
        )
    conn.execute("UPDATE messages SET content = CAST(x'e6bca2ff' AS TEXT) WHERE id = ?", (9004,))
    conn.execute(
        "UPDATE sessions SET message_count = message_count + 2 WHERE session_key = ?",
        (f"mention:{BIG}",),
    )
    sid = conn.execute("SELECT min(id) FROM knowledge_sources").fetchone()[0]
    guild = conn.execute("SELECT guild_id FROM knowledge_sources WHERE id = ?", (sid,)).fetchone()[
        0
    ]
    chunks = [
        (8001, sid, guild, "wrong-dim", np.ones(DIM + 1, "<f4").tobytes(), "{}"),
        (8002, sid, guild, "nan", np.full(DIM, np.nan, "<f4").tobytes(), "{}"),
        (8003, sid, guild, "bad-json", None, "{not json"),
        (8004, sid, guild + 1, "other-guild", np.ones(DIM, "<f4").tobytes(), "{}"),
        (8005, 424242, guild, "no-source", None, "{}"),
        (8006, sid, guild, "nul-json", None, json.dumps({"k": "a\x00b"})),
    ]
    for cid, s_id, g, key, emb, meta in chunks:
        conn.execute(
            "INSERT INTO knowledge_chunks (id, source_id, guild_id, chunk_index, chunk_key,"
            " content, search_text, metadata, embedding, created_at)"
            " VALUES (?, ?, ?, 99, ?, 'x', 'x', ?, ?, ?)",
            (cid, s_id, g, key, meta, emb, t),
        )
    # What follows Discord: links whose parent was refused, and bad memories/usage.
    a_message = conn.execute("SELECT min(id) FROM messages").fetchone()[0]
    a_chunk = conn.execute(
        "SELECT min(id) FROM knowledge_chunks WHERE chunk_key = 'w0'"
    ).fetchone()[0]
    conn.executemany(
        "INSERT INTO message_refs (discord_message_id, message_id, channel_id) VALUES (?, ?, 1)",
        [(7001, 9003), (7002, 424242)],
    )
    conn.executemany(
        "INSERT INTO chunk_messages (id, chunk_id, message_id) VALUES (?, ?, ?)",
        [(6001, 8001, a_message), (6002, a_chunk, 9004)],
    )
    conn.executemany(
        "INSERT INTO memories (id, guild_id, user_id, content, created_at) VALUES (?, ?, ?, ?, ?)",
        [(5001, BIG, 5, "メモ\x00NUL", t), (5002, BIG, 5, "", t), (5003, BIG, "abc", "x", t)],
    )
    conn.executemany(
        "INSERT INTO llm_usage (id, day, guild_id, user_id, model, calls, input_tokens,"
        " output_tokens) VALUES (?, ?, ?, 0, ?, ?, 1, 1)",
        [
            (4001, "not-a-day", BIG, "m", 1),
            (4002, "2026-01-16T23:30:00+09:00", BIG, "from-a-time", 1),
            (4003, "2026-01-16", BIG, "negative", -1),
        ],
    )
    conn.close()
    return {
        "7001": "message 9003 was not moved",
        "7002": "message 424242 was not moved",
        "6001": "chunk 8001 was not moved",
        "6002": "message 9004 was not moved",
        "5002": "content: empty",
        "5003": "user_id: 'abc' is not an integer",
        "4001": "'not-a-day' is not a YYYY-MM-DD day",
        "4003": "calls: -1 is out of range",
        "group:1": "session_type: unknown value 'group'",
        "dm:badtime": "created_at: 'yesterday' is not an ISO 8601 time",
        "9002": "role: unknown value 'robot'",
        "9003": "session 'nowhere:1' was not moved",
        "9004": "content: invalid UTF-8 at byte 3",
        "8001": "9 dimensions, the database records 8",
        "8002": "NaN or infinity",
        "8003": "malformed JSON",
        "8004": "differs from its source's",
        "8005": "source 424242 was not moved",
    }


async def test_dirty_rows_are_moved_converted_or_quarantined(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    src = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    await fill(src, settings, sessions=2, sources=1)
    expected = plant_dirty_rows(sqlite_path_from_url(src))

    dry = await migrate(src, target, settings=settings, dry_run=True)
    assert dry.quarantined == len(expected)
    assert dry.quarantine_path is None and not files("backups/*", tmp_path)
    assert await table_counts(target, settings) == {}  # not even a schema

    report = await migrate(src, target, settings=settings)
    assert report.exit_code == EXIT_QUARANTINED
    assert report.verify is not None and report.verify.identical
    assert report.quarantined == len(expected)
    assert report.quarantine_path is not None
    assert report.quarantine_path.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(x) for x in report.quarantine_path.read_text().splitlines()]
    got = {str(e["key"]): e["reason"] for e in lines}
    assert got.keys() == expected.keys()
    for key, reason in expected.items():
        assert reason in got[key], (key, got[key])
    bad_utf8 = next(e for e in lines if str(e["key"]) == "9004")
    assert bad_utf8["row"]["content"] == {"invalid_utf8_hex": "e6bca2ff"}
    assert bad_utf8["table"] == "messages"
    # The NUL rule: a session key, its message's key and text, a JSON value, a memory.
    assert report.conversions["nul_replaced"] == 5
    assert report.conversions["text_from_blob"] == 1
    assert report.conversions["day_from_time"] == 1
    async with open_database(target, settings=settings) as db:
        nul = await db.load_session("dm:nul\ufffdkey")
        assert nul is not None and [m.content for m in nul.messages] == ["NUL\ufffdinside"]
        mention = await db.load_session(f"mention:{BIG}")
        assert mention is not None
        assert mention.messages[-1].content == "BLOB のテキスト"
        # message_count follows what moved, so appending keeps working.
        assert len(mention.messages) == 5
        sources = await db.list_sources()
        chunks = await db.list_chunks(sources[0].source_id)  # type: ignore[arg-type]
        assert {c.chunk_key: c.metadata for c in chunks}["nul-json"] == {"k": "a\ufffdb"}
        assert "メモ\ufffdNUL" in [m.content for m in await db.list_memories(guild_id=BIG)]
        usage = await db.list_usage(since=date(2026, 1, 16), until=date(2026, 1, 16))
        assert "from-a-time" in [u.model for u in usage]  # 23:30+09:00 is the 16th in UTC
    assert report.message_counts_fixed == 1

    # verify on its own agrees: quarantined rows are expected to be missing.
    again = await verify(src, target, settings=settings)
    assert again.identical
    assert sum(t.source_quarantined for t in again.tables.values()) == len(expected)


async def test_verify_reports_differences(new_database_url: Any, settings: Settings) -> None:
    src = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    await fill(src, settings, sessions=3, sources=2)
    check_clean(await migrate(src, target, settings=settings))
    import asyncpg

    c = await asyncpg.connect(target)
    try:
        await c.execute("UPDATE messages SET content = 'changed' WHERE id = 2")
        await c.execute("DELETE FROM messages WHERE id = 3")
        await c.execute(
            "UPDATE knowledge_chunks SET embedding = embedding + embedding WHERE id = 1"
        )
        await c.execute("INSERT INTO kotonoha_meta (key, value) VALUES ('stray', 'x')")
    finally:
        await c.close()
    report = await verify(src, target, settings=settings)
    assert not report.identical
    msgs = report.tables["messages"]
    assert msgs.missing == [3] and msgs.differing == [{"key": 2, "columns": ["content"]}]
    assert report.tables["knowledge_chunks"].differing == [{"key": 1, "columns": ["embedding"]}]
    assert report.tables["kotonoha_meta"].extra == ["stray"]
    assert report.integrity["sessions whose message_count is wrong"] == 1

    cli = run_cli("db", "verify", "--source", src, "--target", target, "--json", cwd=Path.cwd())
    assert cli.returncode == 1, cli.stderr
    doc = json.loads(cli.stdout)
    assert doc["identical"] is False
    assert doc["tables"]["messages"]["missing"] == [3]


# --- interruption ------------------------------------------------------------------------


async def big_source(url: str, settings: Settings) -> None:
    await fill(url, settings, sessions=0, sources=0)
    path = sqlite_path_from_url(url)
    conn = sqlite3.connect(path, isolation_level=None)
    t = "2026-01-16T09:30:15.000000+00:00"
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO sessions (session_key, session_type, status, version, message_count,"
        " created_at, last_active_at) VALUES (?, 'dm', 'active', 1, 20, ?, ?)",
        [(f"dm:{i}", t, t) for i in range(500)],
    )
    conn.executemany(
        "INSERT INTO messages (session_key, seq, role, content, created_at)"
        " VALUES (?, ?, 'user', ?, ?)",
        [(f"dm:{i}", j, f"メッセージ {i}/{j} 🌸", t) for i in range(500) for j in range(20)],
    )
    conn.execute(
        "INSERT INTO knowledge_sources (guild_id, source_type, uri, title, status, created_at,"
        " updated_at) VALUES (1, 'document', 'big', 'big', 'ready', ?, ?)",
        (t, t),
    )
    vecs = special_vectors(2000, DIM, seed=3)
    conn.executemany(
        "INSERT INTO knowledge_chunks (source_id, guild_id, chunk_index, chunk_key, content,"
        " search_text, embedding, created_at) VALUES (1, 1, ?, ?, ?, ?, ?, ?)",
        [
            (i, f"c{i}", f"猫 {i}", f"猫 {i}", vecs[i].astype("<f4").tobytes(), t)
            for i in range(2000)
        ],
    )
    conn.execute("COMMIT")
    conn.close()


async def _rows(url: str, settings: Settings) -> int:
    counts = await table_counts(url, settings)
    return sum(counts.values())


@pytest.mark.slow
@pytest.mark.parametrize("target_kind", ["postgres", "sqlite"])
async def test_migration_killed_halfway_resumes_to_an_identical_copy(
    target_kind: str, new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    src = await new_database_url("sqlite")
    target = await new_database_url(target_kind)
    await big_source(src, settings)
    total = 500 + 10_000 + 1 + 2000 + 2
    proc = start_cli(
        "db", "migrate", "--source", src, "--target", target, "--batch-size", "25", cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        written = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with_schema = await table_counts(target, settings)
            written = sum(with_schema.values())
            # Well into the messages (after the sessions), but far from done.
            if with_schema.get("messages", 0) >= 1000:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    partial = await _rows(target, settings)
    assert 0 < partial < total, (written, partial)
    marker = await migration_marker(target, settings)
    assert marker is not None
    assert marker["source"] == f"sqlite:///{sqlite_path_from_url(src).resolve()}"

    status = run_cli("db", "status", "--database", target, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["migration_in_progress"]["source"] == marker["source"]
    status = run_cli("db", "status", "--database", target, cwd=tmp_path)
    assert "unfinished migration" in status.stderr

    # Another source may not be poured into the half-full target.
    other = await new_database_url("sqlite")
    await fill(other, settings, sessions=1, sources=0)
    with pytest.raises(MigrationError, match="unfinished migration"):
        await migrate(other, target, settings=settings)

    rerun = await migrate(src, target, settings=settings)
    assert rerun.mode == "resume"
    check_clean(rerun)
    assert sum(t.already_present for t in rerun.tables.values()) > 0
    assert await migration_marker(target, settings) is None
    assert await _rows(target, settings) == total
    assert (await verify(src, target, settings=settings)).identical


async def test_restart_wipes_an_unfinished_migration(
    new_database_url: Any, settings: Settings
) -> None:
    src = await new_database_url("sqlite")
    other = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    await fill(src, settings, sessions=2, sources=1)
    await fill(other, settings, sessions=3, sources=2)
    check_clean(await migrate(other, target, settings=settings))
    with pytest.raises(MigrationError, match="holds none"):
        await migrate(src, target, settings=settings, restart=True)
    # Simulate a crash of a migration from `other`: the marker is back.
    import asyncpg

    c = await asyncpg.connect(target)
    try:
        await c.execute(
            "INSERT INTO kotonoha_meta VALUES ('migration_in_progress', $1)",
            json.dumps({"source": "sqlite:///elsewhere.db"}),
        )
    finally:
        await c.close()
    with pytest.raises(MigrationError, match="elsewhere"):
        await migrate(src, target, settings=settings)
    report = await migrate(src, target, settings=settings, restart=True)
    assert report.mode == "restart"
    check_clean(report)
    assert await snapshot(target, settings) == await snapshot(src, settings)


# --- the command line ----------------------------------------------------------------


async def test_cli_migrate_exit_codes_and_no_password(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    src = await new_database_url("sqlite")
    await fill(src, settings, sessions=2, sources=1)
    plant_dirty_rows(sqlite_path_from_url(src))
    target = await new_database_url("postgres")
    # A password in the URL must never be printed (the test server ignores it).
    with_password = target.replace("postgres:@", "postgres:s3cret-pw@")
    dry = run_cli("db", "migrate", "-s", src, "-t", with_password, "--dry-run", cwd=tmp_path)
    assert dry.returncode == EXIT_QUARANTINED, dry.stderr
    assert "would move" in dry.stderr and "unknown value 'group'" in dry.stderr
    done = run_cli("db", "migrate", "-s", src, "-t", with_password, "--json", cwd=tmp_path)
    assert done.returncode == EXIT_QUARANTINED, done.stderr
    doc = json.loads(done.stdout)
    assert doc["verify"]["identical"] is True and doc["quarantined"] == 18
    assert files("backups/*", tmp_path) == sorted(
        [Path(doc["quarantine_path"]), Path(doc["backup_path"])]
    )
    for out in (dry.stdout, dry.stderr, done.stdout, done.stderr):
        assert "s3cret-pw" not in out
    again = run_cli("db", "migrate", "-s", src, "-t", target, cwd=tmp_path)
    assert again.returncode == 1 and "is not empty" in again.stderr
    assert "Traceback" not in again.stderr
    help_text = run_cli("db", "migrate", "--help", cwd=tmp_path).stdout
    assert "3 = migrated" in help_text


async def test_dropped_connection_then_rerun_resumes(
    new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    """The server kills the migration's connection mid-copy (pg_terminate_backend)."""
    import asyncpg

    src = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    await big_source(src, settings)
    dbname = urlsplit(target).path.lstrip("/")
    task = asyncio.create_task(migrate(src, target, settings=settings, batch_size=25))
    admin = await asyncpg.connect(target)
    try:
        killed = 0
        for _ in range(1200):
            await asyncio.sleep(0.02)
            if task.done():
                break
            if not await admin.fetchval("SELECT to_regclass('messages') IS NOT NULL"):
                continue
            if await admin.fetchval("SELECT count(*) FROM messages") >= 500:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = $1 AND pid <> pg_backend_pid()",
                    dbname,
                )
                break
    finally:
        await admin.close()
        if not task.done():
            with pytest.raises(MigrationError, match="partial copy marked 'migration_in_progress'"):
                await task
    assert killed >= 1
    assert isinstance(task.exception(), MigrationError)
    assert await migration_marker(target, settings) is not None
    rerun = await migrate(src, target, settings=settings)
    assert rerun.mode == "resume"
    check_clean(rerun)
    assert rerun.tables["messages"].already_present >= 500


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (root only); yields its path and a function that enlarges it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (a real full disk)")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64M", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_disk_full_then_rerun_resumes(
    small_disk: Any, new_database_url: Any, settings: Settings
) -> None:
    disk, grow = small_disk
    src = await new_database_url("sqlite")
    await big_source(src, settings)
    target = f"sqlite:///{disk / 'kotonoha.db'}"
    with pytest.raises(MigrationError, match=r"DiskFullError: .* is full") as info:
        await migrate(src, target, settings=settings)
    assert "rerun the same command to resume" in str(info.value)
    assert await migration_marker(target, settings) is not None
    assert 0 < await _rows(target, settings) < 12_503
    grow()
    rerun = await migrate(src, target, settings=settings)
    assert rerun.mode == "resume"
    check_clean(rerun)
    assert await _rows(target, settings) == 12_503


async def test_too_many_dimensions_for_pgvector_is_refused_before_writing(
    new_database_url: Any, settings: Settings
) -> None:
    src = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    await fill(src, settings, sessions=1, sources=1, chunks=2, dim=4001)
    with pytest.raises(MigrationError, match="pgvector indexes at most 4000"):
        await migrate(src, target, settings=settings)
    assert await table_counts(target, settings) == {}
    # SQLite has no such limit: the same source moves there.
    check_clean(await migrate(src, await new_database_url("sqlite"), settings=settings))


def test_transfer_and_backup_import_no_postgres_driver() -> None:
    """SQLite users never load asyncpg: the drivers are imported only when needed."""
    code = (
        "import sys, kotonoha_bot.transfer.copy, kotonoha_bot.transfer.backup, kotonoha_bot.cli.db;"
        " bad = [m for m in ('asyncpg', 'pgvector') if m in sys.modules];"
        " assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


async def test_older_schema_transient_and_unknown_tables(
    new_database_url: Any, settings: Settings
) -> None:
    """Job leases are never moved and a table we do not know is reported."""
    from kotonoha_bot.db.tables import TRANSIENT_TABLES

    src = await new_database_url("sqlite")
    target = await new_database_url("sqlite")
    await fill(src, settings, sessions=2, sources=1)
    conn = sqlite3.connect(sqlite_path_from_url(src), isolation_level=None)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    leases = [t for t in TRANSIENT_TABLES if t in tables]
    for name in leases:
        conn.execute(f"INSERT INTO {name} VALUES ('archive', 'bot-1', '2099-01-01T00:00:00')")
    conn.execute("CREATE TABLE my_notes (x TEXT)")
    conn.execute("INSERT INTO my_notes VALUES ('kept out of the move')")
    conn.close()

    report = await migrate(src, target, settings=settings)
    check_clean(report)
    assert report.warnings == ["not moved (unknown tables): my_notes"]
    out = sqlite3.connect(sqlite_path_from_url(target))
    try:
        for name in leases:
            assert out.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == 0
    finally:
        out.close()


@pytest.mark.parametrize("target_kind", ["sqlite", "postgres"])
async def test_a_schema_2_source_migrates_with_provenance_filled_in(
    target_kind: str, new_database_url: Any, settings: Settings, tmp_path: Path
) -> None:
    """A file of the previous release is upgraded on a private copy, never in place."""
    src = await new_database_url("sqlite")
    target = await new_database_url(target_kind)
    await OLD_SCHEMA_WRITERS["sqlite"](src, BIG, BIG - 1)
    path = sqlite_path_from_url(src)
    original = path.read_bytes()

    report = await migrate(src, target, settings=settings)
    check_clean(report)
    assert report.tables["messages"].moved == 4
    assert report.tables["chunk_messages"].moved == 4
    assert path.read_bytes() == original  # the source was not upgraded
    assert report.backup_path is not None
    assert report.backup_path.read_bytes()[:16] == b"SQLite format 3\x00"
    assert (await verify(src, target, settings=settings)).identical
    async with open_database(target, settings=settings) as db:
        s = await db.load_session("thread:9")
        assert s is not None and [m.turn_id for m in s.messages] == [11, 11, 12, 12]
        change = await db.delete_messages(guild_id=BIG, discord_message_ids=[11])
        assert change.messages == 2 and change.chunks == 1


async def test_a_schema_2_postgres_source_is_upgraded_then_moved(
    new_database_url: Any, settings: Settings
) -> None:
    """A PostgreSQL source is opened like the bot opens it: migration 3 runs first."""
    src = await new_database_url("postgres")
    target = await new_database_url("sqlite")
    await OLD_SCHEMA_WRITERS["postgres"](src, BIG, BIG - 1)
    report = await migrate(src, target, settings=settings)
    check_clean(report)
    assert report.tables["chunk_messages"].moved == 4
    async with open_database(target, settings=settings) as db:
        s = await db.load_session("thread:9")
        assert s is not None and [m.turn_id for m in s.messages] == [11, 11, 12, 12]


async def test_the_pause_switch_moves_and_backup_records_stay_with_their_database(
    new_database_url: Any, settings: Settings
) -> None:
    source = await new_database_url("sqlite")
    target = await new_database_url("postgres")
    async with open_database(source, settings=settings) as db:
        await db.set_paused(True, by="dashboard")
        await db.record_backup(BackupRecord(datetime(2026, 3, 1, tzinfo=UTC), True, "/b/x.db"))
    await migrate(source, target, settings=settings, backup_source=False)
    assert (await verify(source, target, settings=settings)).identical
    async with open_database(target, settings=settings) as db:
        assert (await db.pause_state()).paused  # a paused bot stays paused on the new server
        assert await db.last_backup() is None  # that backup is of the old database
        await db.record_backup(BackupRecord(datetime(2026, 3, 2, tzinfo=UTC), False, error="x"))
    # The target's own upkeep is no difference from the source either.
    assert (await verify(source, target, settings=settings)).identical
