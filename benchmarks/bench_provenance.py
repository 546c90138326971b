"""Following Discord at scale: deletes, edits, forget and provenance reads on a big community.

    .venv/bin/python -m benchmarks.bench_provenance              # 100k messages per backend
    .venv/bin/python -m benchmarks.bench_provenance --scale 0.1  # a quick run (10 %)

Data, per backend (our SQLite, our PostgreSQL): ``2000 x scale`` thread sessions of 50
messages (a user message and the bot's reply per turn, 20 authors) in one guild,
archived like the archiver does — windows of 8 messages sharing 2 — so every chunk
records its 8 messages (``chunk_messages``). Built through the storage contract. No
embeddings: what is measured is storage's own work, not the embedder's.

Measured (p50 / p95 over ``--repeat`` random picks; each pick is a different message):

- ``delete_messages`` of one message: the message, the bot's reply of its turn, every
  chunk built from either, the counters of the session (what ``on_raw_message_delete``
  costs before the re-archiving, which is embedding work);
- ``edit_message`` of one message (the same plus the text update);
- ``chunk_origins`` of 10 chunks (what ``/kb search`` adds for its jump links);
- ``record_reply_parts`` (what every answered Discord turn adds);
- ``forget`` of one user (1/20 of the messages; once);
- the upgrade of a schema-2 database of the same size to this version (migration 3
  fills in channels, turns and chunk provenance; once, on a fresh database).

The PostgreSQL server is ``benchmarks.pgserver`` (or ``BENCH_DATABASE_URL``). Prints one
table and rewrites the "Following Discord" section of docs/PERFORMANCE.md (``--no-write``
to skip). Timings on this shared 2-core host are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.pgserver import bench_server
from benchmarks.util import machine, ms, pct, table
from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.models import ChatSession, KnowledgeChunk, KnowledgeSource, Message

DOC = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"
BEGIN = "<!-- bench_provenance:begin -->"
END = "<!-- bench_provenance:end -->"

GUILD = 1_000_000_000_000_000_001
MESSAGES_PER_SESSION = 50
AUTHORS = 20
WINDOW, OVERLAP = 8, 2
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def discord_id(session: int, index: int) -> int:
    return 10**15 + session * 1000 + index


def session_of(i: int) -> ChatSession:
    s = ChatSession(
        f"thread:{i}", "thread", guild_id=GUILD, channel_id=7, thread_id=100 + i, user_id=None
    )
    for j in range(0, MESSAGES_PER_SESSION, 2):
        author = (i + j) % AUTHORS + 1
        mid = discord_id(i, j)
        when = T0 + timedelta(minutes=i, seconds=j)
        s.add_message(
            Message(
                "user",
                f"話題{i}-{j} について相談です 🌸",
                when,
                author,
                f"u{author}",
                mid,
                100 + i,
                mid,
            )
        )
        s.add_message(
            Message("assistant", f"答え{i}-{j} です", when, None, None, None, 100 + i, mid)
        )
    return s


def spans(n: int) -> list[tuple[int, int]]:
    step = WINDOW - OVERLAP
    out, start = [], 0
    while True:
        end = min(start + WINDOW, n) - 1
        out.append((start, end))
        if end >= n - 1:
            return out
        start += step


async def build(db: DatabaseProtocol, sessions: int) -> int:
    """Sessions through the contract, archived windows with provenance; returns chunks."""
    chunks = 0
    for i in range(sessions):
        await db.save_session(session_of(i))
        stored = await db.load_session(f"thread:{i}")
        assert stored is not None
        source = await db.ensure_source(
            KnowledgeSource(
                guild_id=GUILD,
                uri=f"session:thread:{i}",
                title="c",
                source_type="conversation",
                session_key=f"thread:{i}",
            )
        )
        rows = []
        for a, b in spans(len(stored.messages)):
            part = stored.messages[a : b + 1]
            rows.append(
                KnowledgeChunk(
                    chunk_key=f"thread:{i}:{a}-{b}",
                    content="\n".join(m.content for m in part),
                    chunk_index=a,
                    metadata={
                        "kind": "conversation",
                        "session_key": f"thread:{i}",
                        "first_index": a,
                        "last_index": b,
                        "author_ids": sorted({m.author_id for m in part if m.author_id}),
                    },
                    message_ids=tuple(m.stored_id or 0 for m in part),
                )
            )
        chunks += await db.add_chunks(source.source_id or 0, rows)
        stored.last_archived_message_index = len(stored.messages) - 1
        await db.save_session(stored)
    return chunks


async def analyze(db: DatabaseProtocol, url: str) -> None:
    """Planner statistics, as a database that has been running has them."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            conn.execute("ANALYZE")
        finally:
            conn.close()
        await db.close()  # reopen: the backend's connection reads the new statistics
        await db.initialize()
        return
    import asyncpg

    raw = await asyncpg.connect(url)
    try:
        await raw.execute("ANALYZE")
    finally:
        await raw.close()


@dataclass
class Result:
    backend: str
    messages: int = 0
    chunks: int = 0
    build_s: float = 0.0
    timings: dict[str, list[float]] = field(default_factory=dict)
    once: dict[str, float] = field(default_factory=dict)


async def measure(db: DatabaseProtocol, url: str, sessions: int, repeat: int, seed: int) -> Result:
    res = Result(db.backend_name)
    t = time.perf_counter()
    res.chunks = await build(db, sessions)
    res.build_s = time.perf_counter() - t
    # A database that has run a while has planner statistics (autovacuum, PRAGMA
    # optimize); one bulk-built a second ago has not.
    await analyze(db, url)
    res.messages = sessions * MESSAGES_PER_SESSION
    rng = random.Random(seed)
    picks = rng.sample(
        [(i, j) for i in range(sessions) for j in range(0, MESSAGES_PER_SESSION, 2)],
        3 * repeat,
    )
    deletes, edits, replies = picks[:repeat], picks[repeat : 2 * repeat], picks[2 * repeat :]

    async def timed(name: str, coro: Any) -> Any:
        t = time.perf_counter()
        out = await coro
        res.timings.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for i, j in replies:
        await timed(
            "record_reply_parts",
            db.record_reply_parts(
                f"thread:{i}", discord_id(i, j), 100 + i, [5 * 10**15 + i * 1000 + j]
            ),
        )
    for i, j in edits:
        change = await timed(
            "edit_message",
            db.edit_message(
                guild_id=GUILD, discord_message_id=discord_id(i, j), content="編集済み"
            ),
        )
        assert change.messages >= 1
    for i, j in deletes:
        change = await timed(
            "delete_messages (1 message)",
            db.delete_messages(guild_id=GUILD, discord_message_ids=[discord_id(i, j)]),
        )
        assert change.messages >= 1
    source_ids = [s.source_id or 0 for s in (await db.list_sources(guild_id=GUILD))[:repeat]]
    for sid in source_ids:
        ids = [c.chunk_id or 0 for c in (await db.list_chunks(sid))[:10]]
        await timed("chunk_origins (10 chunks)", db.chunk_origins(ids))
    t = time.perf_counter()
    result = await db.forget(guild_id=GUILD, user_id=3)
    res.once["forget (one of 20 users)"] = time.perf_counter() - t
    res.once["forget: messages removed"] = float(result.messages)
    return res


# --- the upgrade of a schema-2 database ------------------------------------------------------


def _v2_rows(
    sessions: int,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    sess, msgs, chunks = [], [], []
    ts = "2026-01-01T00:00:00.000000+00:00"
    mid = 0
    for i in range(sessions):
        key = f"thread:{i}"
        sess.append(
            (
                key,
                "thread",
                "active",
                GUILD,
                7,
                100 + i,
                None,
                1,
                MESSAGES_PER_SESSION,
                MESSAGES_PER_SESSION - 1,
                ts,
                ts,
            )
        )
        for j in range(MESSAGES_PER_SESSION):
            mid += 1
            user = j % 2 == 0
            msgs.append(
                (
                    mid,
                    key,
                    j,
                    "user" if user else "assistant",
                    f"m{i}-{j}",
                    (i + j) % AUTHORS + 1 if user else None,
                    None,
                    discord_id(i, j) if user else None,
                    ts,
                )
            )
        for a, b in spans(MESSAGES_PER_SESSION):
            chunks.append(
                (
                    i + 1,
                    GUILD,
                    7,
                    a,
                    f"w{a}",
                    f"c{i}-{a}",
                    "c",
                    f'{{"kind":"conversation","session_key":"{key}","first_index":{a},'
                    f'"last_index":{b}}}',
                    ts,
                )
            )
    return sess, msgs, chunks


def build_v2_sqlite(path: Path, sessions: int) -> None:
    from kotonoha_bot.db.sqlite.schema import MIGRATIONS, split_sql

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL)"
    )
    for version, name, sql in MIGRATIONS[:2]:
        for statement in split_sql(sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, '2026')", (version, name))
    sess, msgs, chunks = _v2_rows(sessions)
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO sessions VALUES ({','.join('?' * 12)})", sess)
    conn.executemany(
        "INSERT INTO messages (id, session_key, seq, role, content, author_id, author_name,"
        " discord_message_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        msgs,
    )
    conn.executemany(
        "INSERT INTO knowledge_sources (id, guild_id, channel_id, source_type, uri, title,"
        " content_hash, status, metadata, session_key, created_at, updated_at) VALUES"
        " (?, ?, 7, 'conversation', ?, 'c', '', 'ready', '{}', ?, ?, ?)",
        [
            (i + 1, GUILD, f"session:thread:{i}", f"thread:{i}", s[10], s[10])
            for i, s in enumerate(sess)
        ],
    )
    conn.executemany(
        "INSERT INTO knowledge_chunks (source_id, guild_id, channel_id, chunk_index, chunk_key,"
        " content, search_text, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        chunks,
    )
    conn.execute("COMMIT")
    conn.close()


async def build_v2_postgres(url: str, sessions: int) -> None:
    import asyncpg

    from kotonoha_bot.db.postgres.schema import CREATE_MIGRATIONS_TABLE, MIGRATIONS

    def when(text: str) -> datetime:
        return datetime.fromisoformat(text)

    sess, msgs, chunks = _v2_rows(sessions)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        for version, name, sql in MIGRATIONS[:2]:
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
        await conn.copy_records_to_table(
            "sessions", records=[(*s[:10], when(s[10]), when(s[11])) for s in sess]
        )
        await conn.copy_records_to_table(
            "messages",
            records=[(*m[:8], when(m[8])) for m in msgs],
            columns=[
                "id",
                "session_key",
                "seq",
                "role",
                "content",
                "author_id",
                "author_name",
                "discord_message_id",
                "created_at",
            ],
        )
        await conn.copy_records_to_table(
            "knowledge_sources",
            records=[
                (
                    i + 1,
                    GUILD,
                    7,
                    "conversation",
                    f"session:thread:{i}",
                    "c",
                    "",
                    "ready",
                    "{}",
                    f"thread:{i}",
                    when(s[10]),
                    when(s[10]),
                )
                for i, s in enumerate(sess)
            ],
            columns=[
                "id",
                "guild_id",
                "channel_id",
                "source_type",
                "uri",
                "title",
                "content_hash",
                "status",
                "metadata",
                "session_key",
                "created_at",
                "updated_at",
            ],
        )
        await conn.copy_records_to_table(
            "knowledge_chunks",
            records=[(*c[:8], when(c[8])) for c in chunks],
            columns=[
                "source_id",
                "guild_id",
                "channel_id",
                "chunk_index",
                "chunk_key",
                "content",
                "search_text",
                "metadata",
                "created_at",
            ],
        )
    finally:
        await conn.close()


async def upgrade_seconds(url: str, settings: Settings) -> tuple[float, int]:
    t = time.perf_counter()
    async with open_database(url, settings=settings) as db:
        seconds = time.perf_counter() - t
        links = sum(len(o.message_ids) for o in (await db.chunk_origins([1, 2, 3])).values())
    return seconds, links


# --- the report -------------------------------------------------------------------------


def render(results: list[Result], upgrades: dict[str, float], args: argparse.Namespace) -> str:
    names = [
        "record_reply_parts",
        "edit_message",
        "delete_messages (1 message)",
        "chunk_origins (10 chunks)",
    ]
    header = [
        "operation",
        *(f"{r.backend} p50 ms" for r in results),
        *(f"{r.backend} p95 ms" for r in results),
    ]
    rows = []
    for name in names:
        rows.append(
            [
                name,
                *(ms(pct(r.timings.get(name, []), 50)) for r in results),
                *(ms(pct(r.timings.get(name, []), 95)) for r in results),
            ]
        )
    once = [
        [
            "forget (one of 20 users, once)",
            *(ms(r.once["forget (one of 20 users)"]) for r in results),
            *("" for _ in results),
        ],
        [
            "upgrade from schema 2 (once)",
            *(ms(upgrades[r.backend]) for r in results),
            *("" for _ in results),
        ],
    ]
    r0 = results[0]
    m = machine()
    host = f"{m['cpu']}, {m['nproc']} cores, {m['memory']}, Python {m['python']}"
    command = "python -m benchmarks.bench_provenance" + (
        f" {shlex.join(sys.argv[1:])}" if sys.argv[1:] else ""
    )
    lines = [
        BEGIN,
        "## Following Discord (provenance, edits, deletes, forget)",
        "",
        f"Measured with `.venv/bin/python -m benchmarks.bench_provenance` (`{command}`) on"
        f" {host}. Per backend: {r0.messages:,} messages in {r0.messages // 50:,} thread"
        f" sessions of one guild (a user message and the bot's reply per turn, 20 authors),"
        f" archived into {r0.chunks:,} windows of {WINDOW} messages (sharing {OVERLAP}) that"
        f" record their messages; no embeddings; ANALYZE after the build. {args.repeat} random"
        " picks per operation,"
        " each a different message. Times are storage's own work (the re-archiving after a"
        " delete or edit is embedding work and not included).",
        "",
        table(header, rows + once),
        "",
        "Building the data through the contract took "
        + ", ".join(f"{r.backend} {r.build_s:.0f} s" for r in results)
        + f"; `forget` removed {int(r0.once['forget: messages removed']):,} messages"
        " (the user's and the bot's replies to them). The upgrade is opening a schema-2"
        " database of the same size with this version (migration 3: channels, turns and"
        " chunk provenance filled in from the existing rows).",
        "",
        END,
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(head + section + tail, encoding="utf-8")
    else:
        DOC.write_text(text.rstrip() + "\n\n" + section + "\n", encoding="utf-8")


async def main(args: argparse.Namespace) -> None:
    sessions = max(2, int(2000 * args.scale))
    results: list[Result] = []
    upgrades: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kotonoha-bench-prov-") as tmp, bench_server() as pg:
        work = Path(tmp)
        settings = Settings(_env_file=None, database_path=work / "x.db")  # type: ignore[call-arg]
        urls = {
            "sqlite": f"sqlite:///{work / 'current.db'}",
            "postgresql": await pg.create_database("prov"),
        }
        for backend, url in urls.items():
            print(
                f"{backend}: building {sessions * 50:,} messages ...", file=sys.stderr, flush=True
            )
            async with open_database(url, settings=settings) as db:
                results.append(await measure(db, url, sessions, args.repeat, args.seed))
        old_sqlite = work / "v2.db"
        await asyncio.to_thread(build_v2_sqlite, old_sqlite, sessions)
        upgrades["sqlite"], _ = await upgrade_seconds(f"sqlite:///{old_sqlite}", settings)
        old_pg = await pg.create_database("provv2")
        await build_v2_postgres(old_pg, sessions)
        upgrades["postgresql"], _ = await upgrade_seconds(old_pg, settings)
        for url in (urls["postgresql"], old_pg):
            await pg.drop_database(url)
    section = render(results, upgrades, args)
    print(section)
    if not args.no_write:
        write_doc(section)
        print(f"wrote {DOC}", file=sys.stderr)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of 2000 sessions x 50")
    p.add_argument("--repeat", type=int, default=30, help="random picks per operation")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--no-write", action="store_true", help="do not rewrite docs/PERFORMANCE.md")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
