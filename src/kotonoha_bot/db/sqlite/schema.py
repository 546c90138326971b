"""SQLite schema: the migrations, in order, and how a migration script is split.

Append a migration at the end with the next number; never edit an applied one. The
PostgreSQL schema (``db/postgres/schema.py``) holds the same tables.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE kotonoha_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

        CREATE TABLE sessions (
            session_key TEXT PRIMARY KEY,
            session_type TEXT NOT NULL
                CHECK (session_type IN ('mention', 'thread', 'eavesdrop', 'dm')),
            status TEXT NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'archived', 'closed')),
            guild_id INTEGER,
            channel_id INTEGER,
            thread_id INTEGER,
            user_id INTEGER,
            version INTEGER NOT NULL,
            message_count INTEGER NOT NULL DEFAULT 0,
            last_archived_message_index INTEGER NOT NULL DEFAULT -1,
            created_at TEXT NOT NULL,
            last_active_at TEXT NOT NULL
        );
        CREATE INDEX sessions_guild_idx ON sessions (guild_id, channel_id);
        CREATE INDEX sessions_active_idx ON sessions (status, last_active_at);

        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_key TEXT NOT NULL REFERENCES sessions (session_key) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
            content TEXT NOT NULL,
            author_id INTEGER,
            author_name TEXT,
            discord_message_id INTEGER,
            created_at TEXT NOT NULL,
            UNIQUE (session_key, seq)
        );
        CREATE INDEX messages_author_idx ON messages (author_id);

        CREATE TABLE knowledge_sources (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            guild_id INTEGER NOT NULL,
            channel_id INTEGER,
            source_type TEXT NOT NULL CHECK (source_type IN ('document', 'conversation')),
            uri TEXT NOT NULL,
            title TEXT NOT NULL,
            content_hash TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'failed')),
            metadata TEXT NOT NULL DEFAULT '{}',
            session_key TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (guild_id, uri)
        );
        CREATE INDEX knowledge_sources_status_idx ON knowledge_sources (status);

        CREATE TABLE knowledge_chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            source_id INTEGER NOT NULL REFERENCES knowledge_sources (id) ON DELETE CASCADE,
            guild_id INTEGER NOT NULL,
            channel_id INTEGER,
            chunk_index INTEGER NOT NULL,
            chunk_key TEXT NOT NULL,
            content TEXT NOT NULL,
            search_text TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            embedding BLOB,
            created_at TEXT NOT NULL,
            UNIQUE (source_id, chunk_key)
        );
        CREATE INDEX knowledge_chunks_scope_idx ON knowledge_chunks (guild_id, channel_id);
        CREATE INDEX knowledge_chunks_pending_idx ON knowledge_chunks (id)
            WHERE embedding IS NULL;

        CREATE VIRTUAL TABLE knowledge_chunks_fts USING fts5 (
            search_text,
            content = 'knowledge_chunks',
            content_rowid = 'id',
            tokenize = 'unicode61 remove_diacritics 0'
        );
        CREATE TRIGGER knowledge_chunks_fts_ins AFTER INSERT ON knowledge_chunks BEGIN
            INSERT INTO knowledge_chunks_fts (rowid, search_text)
            VALUES (new.id, new.search_text);
        END;
        CREATE TRIGGER knowledge_chunks_fts_del AFTER DELETE ON knowledge_chunks BEGIN
            INSERT INTO knowledge_chunks_fts (knowledge_chunks_fts, rowid, search_text)
            VALUES ('delete', old.id, old.search_text);
        END;
        CREATE TRIGGER knowledge_chunks_fts_upd AFTER UPDATE OF search_text
            ON knowledge_chunks BEGIN
            INSERT INTO knowledge_chunks_fts (knowledge_chunks_fts, rowid, search_text)
            VALUES ('delete', old.id, old.search_text);
            INSERT INTO knowledge_chunks_fts (rowid, search_text)
            VALUES (new.id, new.search_text);
        END;

        CREATE TABLE reembed_vectors (
            chunk_id INTEGER PRIMARY KEY REFERENCES knowledge_chunks (id) ON DELETE CASCADE,
            embedding BLOB NOT NULL
        );
        """,
    ),
    (
        2,
        "job leases",
        """
        CREATE TABLE job_leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        "provenance, explicit memories and usage",
        """
        -- Where each message is on Discord, and the turn it belongs to (see Message).
        ALTER TABLE messages ADD COLUMN channel_id INTEGER;
        ALTER TABLE messages ADD COLUMN turn_id INTEGER;
        CREATE INDEX messages_discord_idx ON messages (discord_message_id)
            WHERE discord_message_id IS NOT NULL;
        CREATE INDEX messages_turn_idx ON messages (session_key, turn_id)
            WHERE turn_id IS NOT NULL;
        CREATE INDEX messages_channel_idx ON messages (channel_id)
            WHERE channel_id IS NOT NULL;
        -- Older rows: a message was posted in its session's thread, else its channel;
        -- a reply belongs to the turn of the user message before it.
        UPDATE messages SET channel_id = (SELECT coalesce(s.thread_id, s.channel_id)
            FROM sessions s WHERE s.session_key = messages.session_key)
            WHERE discord_message_id IS NOT NULL;
        UPDATE messages SET turn_id = discord_message_id WHERE role = 'user';
        UPDATE messages SET turn_id = (SELECT p.discord_message_id FROM messages p
            WHERE p.session_key = messages.session_key AND p.seq < messages.seq
            AND p.role = 'user' ORDER BY p.seq DESC LIMIT 1)
            WHERE role = 'assistant';

        -- The Discord messages the bot sent as a reply (a long reply is several).
        CREATE TABLE message_refs (
            discord_message_id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            channel_id INTEGER NOT NULL
        );
        CREATE INDEX message_refs_message_idx ON message_refs (message_id);

        -- Provenance: the stored messages each conversation chunk was built from.
        CREATE TABLE chunk_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chunk_id INTEGER NOT NULL REFERENCES knowledge_chunks (id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            UNIQUE (chunk_id, message_id)
        );
        CREATE INDEX chunk_messages_message_idx ON chunk_messages (message_id);
        -- Chunks archived before this version: their window's messages by position.
        INSERT OR IGNORE INTO chunk_messages (chunk_id, message_id)
            SELECT c.id, m.id FROM knowledge_chunks c
            JOIN (SELECT id, session_key,
                         row_number() OVER (PARTITION BY session_key ORDER BY seq) - 1 AS idx
                  FROM messages) m
              ON m.session_key = json_extract(c.metadata, '$.session_key')
             AND m.idx BETWEEN json_extract(c.metadata, '$.first_index')
                           AND json_extract(c.metadata, '$.last_index')
            WHERE json_extract(c.metadata, '$.kind') IN ('conversation', 'summary')
              AND json_type(c.metadata, '$.first_index') = 'integer'
              AND json_type(c.metadata, '$.last_index') = 'integer'
            ORDER BY c.id, m.id;

        CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            guild_id INTEGER,
            user_id INTEGER NOT NULL,
            content TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX memories_owner_idx ON memories (guild_id, user_id, id);

        -- One row per UTC day, guild, user and model; 0 = no guild (DMs) / no user.
        CREATE TABLE llm_usage (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            day TEXT NOT NULL,
            guild_id INTEGER NOT NULL DEFAULT 0,
            user_id INTEGER NOT NULL DEFAULT 0,
            model TEXT NOT NULL,
            calls INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            UNIQUE (day, guild_id, user_id, model)
        );
        CREATE INDEX llm_usage_guild_idx ON llm_usage (guild_id, day);
        """,
    ),
]


LATEST_SCHEMA_VERSION = MIGRATIONS[-1][0]


def split_sql(script: str) -> list[str]:
    """Split a migration script into statements (triggers keep their inner semicolons)."""
    statements, buf = [], []
    for line in script.splitlines():
        buf.append(line)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        statements.append(rest)
    return statements
