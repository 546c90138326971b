"""A database written by schema version 2 (before provenance), on either backend.

Rows are planted with the old DDL and raw SQL, the way the previous release wrote
them: one thread session of four messages (two turns) and one archived window.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

OLD_ROWS = [
    "INSERT INTO sessions (session_key, session_type, status, guild_id, channel_id, thread_id,"
    " user_id, version, message_count, last_archived_message_index, created_at,"
    " last_active_at) VALUES ('thread:9', 'thread', 'active', {g}, {c}, 9, NULL, 1, 4, 3,"
    " '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
    *(
        "INSERT INTO messages (session_key, seq, role, content, author_id, author_name,"
        f" discord_message_id, created_at) VALUES ('thread:9', {i}, '{role}', '{text}',"
        f" {author}, NULL, {mid}, '2026-01-01T00:00:0{i}+00:00')"
        for i, role, text, author, mid in [
            (0, "user", "古い秘密", 301, 11),
            (1, "assistant", "echo: 古い秘密", "NULL", "NULL"),
            (2, "user", "古いふつう", 302, 12),
            (3, "assistant", "echo: 古いふつう", "NULL", "NULL"),
        ]
    ),
    "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
    " content_hash, status, metadata, session_key, created_at, updated_at) VALUES"
    " ({g}, {c}, 'conversation', 'session:thread:9', 'c', '', 'ready', '{{}}', 'thread:9',"
    " '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
    "INSERT INTO knowledge_chunks (source_id, guild_id, channel_id, chunk_index, chunk_key,"
    " content, search_text, metadata, created_at) VALUES (1, {g}, {c}, 0, 'w0',"
    ' \'古い秘密 古いふつう\', \'古い\', \'{{"kind": "conversation", "session_key":'
    ' "thread:9", "first_index": 0, "last_index": 3}}\', \'2026-01-01T00:00:00+00:00\')',
]


async def _old_sqlite(url: str, guild: int, channel: int) -> None:
    import sqlite3

    from kotonoha_bot.db import sqlite_path_from_url
    from kotonoha_bot.db.sqlite.schema import MIGRATIONS, split_sql

    conn = sqlite3.connect(sqlite_path_from_url(url), isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL)"
    )
    for version, name, sql in MIGRATIONS[:2]:
        for statement in split_sql(sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, '2026')", (version, name))
    for statement in OLD_ROWS:
        conn.execute(statement.format(g=guild, c=channel))
    conn.close()


async def _old_postgres(url: str, guild: int, channel: int) -> None:
    import asyncpg

    from kotonoha_bot.db.postgres.schema import CREATE_MIGRATIONS_TABLE, MIGRATIONS

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        for version, name, sql in MIGRATIONS[:2]:
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
        for statement in OLD_ROWS:
            await conn.execute(statement.format(g=guild, c=channel))
    finally:
        await conn.close()


#: backend name -> writer(url, guild_id, channel_id)
OLD_SCHEMA_WRITERS: dict[str, Callable[[str, int, int], Awaitable[None]]] = {
    "sqlite": _old_sqlite,
    "postgres": _old_postgres,
}
