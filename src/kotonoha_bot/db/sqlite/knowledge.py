"""SQLite: knowledge sources and chunks, pending embeddings, and re-embedding.

A source and its chunks are written in one transaction; every chunk carries its
source's guild (checked before anything is written), so knowledge never crosses
guilds. The vector cache follows a change only after it commits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite
import numpy as np

from kotonoha_bot.db.checks import (
    check_chunk_scope,
    check_chunks,
    check_embedding_config,
    check_ids,
    check_limit,
    check_source,
    check_vector,
    config_from_meta,
    require_config,
    source_status,
)
from kotonoha_bot.db.contract import ReembedStatus
from kotonoha_bot.db.sqlite.values import dt as _dt
from kotonoha_bot.db.sqlite.values import ts as _ts
from kotonoha_bot.db.tables import SOURCE_STATUS_SQL, canonical_json
from kotonoha_bot.errors import (
    InvalidInputError,
    NotFoundError,
)
from kotonoha_bot.models import (
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    PendingChunk,
    SourceStatus,
    Vector,
    utcnow,
)
from kotonoha_bot.text import (
    check_text,
    keyword_document,
)

if TYPE_CHECKING:
    pass
from kotonoha_bot.db.sqlite.connection import SQLiteConnection, from_blob, to_blob


class SQLiteKnowledge(SQLiteConnection):
    """Mixed into :class:`~kotonoha_bot.db.sqlite.database.SQLiteDatabase`."""

    if TYPE_CHECKING:  # provenance (db/sqlite/provenance.py), mixed in beside this

        async def _chunk_message_ids(
            self, conn: aiosqlite.Connection, chunk_ids: Sequence[int]
        ) -> dict[int, tuple[int, ...]]: ...
        async def _missing_messages(
            self, conn: aiosqlite.Connection, chunks: Sequence[KnowledgeChunk]
        ) -> set[int]: ...
        async def _link_chunk(
            self, conn: aiosqlite.Connection, chunk_id: int, message_ids: Sequence[int]
        ) -> None: ...

    # --- knowledge ------------------------------------------------------------------

    async def save_source(
        self, source: KnowledgeSource, chunks: Sequence[KnowledgeChunk]
    ) -> KnowledgeSource:
        where = f"source {source.uri!r}"
        async with self._write(f"saving {where}") as conn:
            config = await self._read_config(conn)
            check_source(source, chunks, config.dimension if config else None)
            require_config(config, any(c.embedding is not None for c in chunks), where)
            check_chunk_scope(source.guild_id, chunks, where)
            now = _ts(utcnow())
            status: SourceStatus = source_status(chunks)
            existing = await (
                await conn.execute(
                    "SELECT id, created_at FROM knowledge_sources WHERE guild_id = ? AND uri = ?",
                    (source.guild_id, source.uri),
                )
            ).fetchone()
            removed: list[int] = []
            if existing is not None:
                source_id, created = int(existing[0]), existing[1]
                removed = [
                    r[0]
                    for r in await (
                        await conn.execute(
                            "SELECT id FROM knowledge_chunks WHERE source_id = ?", (source_id,)
                        )
                    ).fetchall()
                ]
                await conn.execute("DELETE FROM knowledge_chunks WHERE source_id = ?", (source_id,))
                await conn.execute(
                    "UPDATE knowledge_sources SET channel_id = ?, source_type = ?, title = ?,"
                    " content_hash = ?, status = ?, metadata = ?, session_key = ?, updated_at = ?"
                    " WHERE id = ?",
                    (
                        source.channel_id,
                        source.source_type,
                        source.title,
                        source.content_hash,
                        status,
                        canonical_json(source.metadata),
                        source.session_key,
                        now,
                        source_id,
                    ),
                )
            else:
                created = now
                cur = await conn.execute(
                    "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
                    " content_hash, status, metadata, session_key, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        source.guild_id,
                        source.channel_id,
                        source.source_type,
                        source.uri,
                        source.title,
                        source.content_hash,
                        status,
                        canonical_json(source.metadata),
                        source.session_key,
                        now,
                        now,
                    ),
                )
                assert cur.lastrowid is not None
                source_id = int(cur.lastrowid)
            added = await self._insert_chunks(conn, source_id, source, chunks, now)
        self._cache_remove(removed)
        self._cache_add(added)
        return KnowledgeSource(
            guild_id=source.guild_id,
            uri=source.uri,
            title=source.title,
            source_type=source.source_type,
            channel_id=source.channel_id,
            content_hash=source.content_hash,
            status=status,
            metadata=dict(source.metadata),
            session_key=source.session_key,
            source_id=source_id,
            created_at=_dt(created),
            updated_at=_dt(now),
        )

    async def _insert_chunks(
        self,
        conn: aiosqlite.Connection,
        source_id: int,
        source: KnowledgeSource,
        chunks: Sequence[KnowledgeChunk],
        now: str,
    ) -> list[tuple[int, int, int | None, Vector]]:
        """Insert chunks (skipping existing keys); return the embedded ones for the cache."""
        added: list[tuple[int, int, int | None, Vector]] = []
        missing = await self._missing_messages(conn, chunks)
        for c in chunks:
            if missing and not missing.isdisjoint(c.message_ids):
                continue  # a message of its window was deleted meanwhile: never store it
            channel = c.channel_id if c.channel_id is not None else source.channel_id
            vec = None if c.embedding is None else check_vector(c.embedding, None, "chunk")
            cur = await conn.execute(
                "INSERT INTO knowledge_chunks (source_id, guild_id, channel_id, chunk_index,"
                " chunk_key, content, search_text, metadata, embedding, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source_id, chunk_key) DO NOTHING",
                (
                    source_id,
                    source.guild_id,
                    channel,
                    c.chunk_index,
                    c.chunk_key,
                    c.content,
                    keyword_document(c.content),
                    canonical_json(c.metadata),
                    None if vec is None else to_blob(vec),
                    now,
                ),
            )
            if cur.rowcount and c.message_ids:
                assert cur.lastrowid is not None
                await self._link_chunk(conn, int(cur.lastrowid), c.message_ids)
            if cur.rowcount and vec is not None:
                assert cur.lastrowid is not None
                added.append((int(cur.lastrowid), source.guild_id, channel, vec))
            elif cur.rowcount:
                added.append((-1, 0, None, np.zeros(0, np.float32)))  # counted, not cached
        return added

    async def ensure_source(self, source: KnowledgeSource) -> KnowledgeSource:
        check_source(source, [], None)
        async with self._write(f"creating source {source.uri!r}") as conn:
            now = _ts(utcnow())
            await conn.execute(
                "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
                " content_hash, status, metadata, session_key, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'ready', ?, ?, ?, ?)"
                " ON CONFLICT (guild_id, uri) DO NOTHING",
                (
                    source.guild_id,
                    source.channel_id,
                    source.source_type,
                    source.uri,
                    source.title,
                    source.content_hash,
                    canonical_json(source.metadata),
                    source.session_key,
                    now,
                    now,
                ),
            )
            row = await (
                await conn.execute(
                    f"SELECT {self._SOURCE_COLS} FROM knowledge_sources"
                    " WHERE guild_id = ? AND uri = ?",
                    (source.guild_id, source.uri),
                )
            ).fetchone()
        assert row is not None
        return self._source(row)

    async def add_chunks(self, source_id: int, chunks: Sequence[KnowledgeChunk]) -> int:
        check_ids("add_chunks", source_id)
        async with self._write(f"adding chunks to source {source_id}") as conn:
            row = await (
                await conn.execute(
                    "SELECT guild_id, channel_id, uri, title FROM knowledge_sources WHERE id = ?",
                    (source_id,),
                )
            ).fetchone()
            if row is None:
                raise NotFoundError(f"knowledge source {source_id} does not exist")
            source = KnowledgeSource(guild_id=row[0], channel_id=row[1], uri=row[2], title=row[3])
            where = f"source {source.uri!r}"
            config = await self._read_config(conn)
            check_chunks(chunks, config.dimension if config else None, where)
            require_config(config, any(c.embedding is not None for c in chunks), where)
            check_chunk_scope(source.guild_id, chunks, where)
            now = _ts(utcnow())
            added = await self._insert_chunks(conn, source_id, source, chunks, now)
            if added:
                await self._refresh_status(conn, [source_id], now)
        self._cache_add(added)
        return len(added)

    async def set_source_hash(self, source_id: int, content_hash: str) -> bool:
        check_ids("set_source_hash", source_id)
        check_text(content_hash, "content_hash")
        async with self._write(f"recording the hash of source {source_id}") as conn:
            cur = await conn.execute(
                "UPDATE knowledge_sources SET content_hash = ?, updated_at = ? WHERE id = ?",
                (content_hash, _ts(utcnow()), source_id),
            )
            return cur.rowcount > 0

    @staticmethod
    async def _refresh_status(
        conn: aiosqlite.Connection, source_ids: Iterable[int], now: str
    ) -> None:
        await conn.executemany(
            "UPDATE knowledge_sources SET updated_at = ?, status = "
            + SOURCE_STATUS_SQL.format(source="?")
            + " WHERE id = ?",
            [(now, sid, sid) for sid in source_ids],
        )

    _SOURCE_COLS = (
        "id, guild_id, channel_id, source_type, uri, title, content_hash, status, metadata,"
        " session_key, created_at, updated_at"
    )

    @staticmethod
    def _source(r: Sequence[Any]) -> KnowledgeSource:
        return KnowledgeSource(
            source_id=r[0],
            guild_id=r[1],
            channel_id=r[2],
            source_type=r[3],
            uri=r[4],
            title=r[5],
            content_hash=r[6],
            status=r[7],
            metadata=json.loads(r[8]),
            session_key=r[9],
            created_at=_dt(r[10]),
            updated_at=_dt(r[11]),
        )

    async def get_source(self, source_id: int) -> KnowledgeSource | None:
        check_ids("get_source", source_id)
        async with self._read(f"reading source {source_id}") as conn:
            row = await (
                await conn.execute(
                    f"SELECT {self._SOURCE_COLS} FROM knowledge_sources WHERE id = ?", (source_id,)
                )
            ).fetchone()
        return None if row is None else self._source(row)

    async def find_source(self, guild_id: int, uri: str) -> KnowledgeSource | None:
        check_ids("find_source", guild_id)
        async with self._read(f"finding source {uri!r}") as conn:
            row = await (
                await conn.execute(
                    f"SELECT {self._SOURCE_COLS} FROM knowledge_sources"
                    " WHERE guild_id = ? AND uri = ?",
                    (guild_id, uri),
                )
            ).fetchone()
        return None if row is None else self._source(row)

    async def list_sources(
        self, *, guild_id: int | None = None, status: str | None = None
    ) -> list[KnowledgeSource]:
        check_ids("list_sources", guild_id)
        where: list[str] = []
        params: list[Any] = []
        if guild_id is not None:
            where.append("guild_id = ?")
            params.append(guild_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = (
            f"SELECT {self._SOURCE_COLS} FROM knowledge_sources"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id"
        )
        async with self._read("listing sources") as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [self._source(r) for r in rows]

    async def delete_source(self, source_id: int) -> bool:
        check_ids("delete_source", source_id)
        async with self._write(f"deleting source {source_id}") as conn:
            removed = [
                r[0]
                for r in await (
                    await conn.execute(
                        "SELECT id FROM knowledge_chunks WHERE source_id = ?", (source_id,)
                    )
                ).fetchall()
            ]
            cur = await conn.execute("DELETE FROM knowledge_sources WHERE id = ?", (source_id,))
            existed = cur.rowcount > 0
        self._cache_remove(removed)
        return existed

    async def list_chunks(self, source_id: int) -> list[KnowledgeChunk]:
        check_ids("list_chunks", source_id)
        async with self._read(f"listing chunks of source {source_id}") as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, source_id, guild_id, channel_id, chunk_index, chunk_key, content,"
                    " metadata, embedding FROM knowledge_chunks WHERE source_id = ?"
                    " ORDER BY chunk_index, id",
                    (source_id,),
                )
            ).fetchall()
            links = await self._chunk_message_ids(conn, [int(r[0]) for r in rows])
        return [
            KnowledgeChunk(
                chunk_id=r[0],
                source_id=r[1],
                guild_id=r[2],
                channel_id=r[3],
                chunk_index=r[4],
                chunk_key=r[5],
                content=r[6],
                metadata=json.loads(r[7]),
                embedding=None if r[8] is None else from_blob(r[8]),
                message_ids=links.get(int(r[0]), ()),
            )
            for r in rows
        ]

    async def _chunks_to_embed(self, what: str, where: str, limit: int) -> list[PendingChunk]:
        """Chunks matching ``where`` (SQL over alias ``c``), by id: work for an embedder."""
        async with self._read(what) as conn:
            rows = await (
                await conn.execute(
                    "SELECT c.id, c.source_id, c.content FROM knowledge_chunks c"
                    f" WHERE {where} ORDER BY c.id LIMIT ?",
                    (limit,),
                )
            ).fetchall()
        return [PendingChunk(chunk_id=r[0], source_id=r[1], content=r[2]) for r in rows]

    async def pending_chunks(self, limit: int = 100) -> list[PendingChunk]:
        check_limit(limit, "pending_chunks")
        return await self._chunks_to_embed(
            "listing chunks awaiting embeddings", "c.embedding IS NULL", limit
        )

    async def set_chunk_embeddings(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("set_chunk_embeddings", *(i for i, _ in items))
        async with self._write("storing embeddings") as conn:
            config = await self._read_config(conn)
            if config is None and items:
                raise InvalidInputError(
                    "no embedding model recorded in this database yet;"
                    " call set_embedding_config before writing vectors"
                )
            dim = config.dimension if config else None
            checked = [(int(cid), check_vector(v, dim, f"chunk {cid}")) for cid, v in items]
            updated: list[tuple[int, int, int | None, Vector]] = []
            sources: set[int] = set()
            for cid, vec in checked:
                row = await (
                    await conn.execute(
                        "UPDATE knowledge_chunks SET embedding = ? WHERE id = ?"
                        " RETURNING source_id, guild_id, channel_id",
                        (to_blob(vec), cid),
                    )
                ).fetchone()
                if row is not None:
                    sources.add(int(row[0]))
                    updated.append((cid, int(row[1]), row[2], vec))
            await self._refresh_status(conn, sorted(sources), _ts(utcnow()))
        self._cache_add(updated)
        return len(updated)

    # --- re-embedding ---------------------------------------------------------------

    async def _reembed_target(self, conn: aiosqlite.Connection) -> EmbeddingConfig | None:
        rows = await (
            await conn.execute(
                "SELECT key, value FROM kotonoha_meta"
                " WHERE key IN ('reembed_model', 'reembed_dimension')"
            )
        ).fetchall()
        return config_from_meta({r[0]: r[1] for r in rows}, "reembed")

    async def begin_reembed(self, target: EmbeddingConfig) -> None:
        async with self._write("starting a re-embedding") as conn:
            check_embedding_config(None, target)
            current = await self._read_config(conn)
            if current == target:
                raise InvalidInputError(
                    f"the database already uses {target.model!r} ({target.dimension} dims)"
                )
            running = await self._reembed_target(conn)
            if running is not None and running != target:
                await conn.execute("DELETE FROM reembed_vectors")
            await conn.executemany(
                "INSERT OR REPLACE INTO kotonoha_meta (key, value) VALUES (?, ?)",
                [("reembed_model", target.model), ("reembed_dimension", str(target.dimension))],
            )

    async def reembed_todo(self, limit: int = 100) -> list[PendingChunk]:
        check_limit(limit, "reembed_todo")
        return await self._chunks_to_embed(
            "listing chunks to re-embed",
            "NOT EXISTS (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)",
            limit,
        )

    async def store_reembed(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("store_reembed", *(i for i, _ in items))
        async with self._write("storing re-embedded vectors") as conn:
            target = await self._reembed_target(conn)
            if target is None:
                raise InvalidInputError("no re-embedding is running (call begin_reembed first)")
            checked = [(int(c), check_vector(v, target.dimension, f"chunk {c}")) for c, v in items]
            cur = await conn.executemany(
                "INSERT OR REPLACE INTO reembed_vectors (chunk_id, embedding)"
                " SELECT ?, ? WHERE EXISTS (SELECT 1 FROM knowledge_chunks WHERE id = ?)",
                [(c, to_blob(v), c) for c, v in checked],
            )
            return max(cur.rowcount, 0)

    async def reembed_status(self) -> ReembedStatus | None:
        async with self._read("reading re-embedding progress") as conn:
            target = await self._reembed_target(conn)
            if target is None:
                return None
            row = await (
                await conn.execute(
                    "SELECT (SELECT count(*) FROM reembed_vectors),"
                    " (SELECT count(*) FROM knowledge_chunks)"
                )
            ).fetchone()
        assert row is not None
        return ReembedStatus(target=target, done=int(row[0]), total=int(row[1]))

    async def finish_reembed(self) -> EmbeddingConfig:
        async with self._write("switching to the re-embedded vectors") as conn:
            target = await self._reembed_target(conn)
            if target is None:
                raise InvalidInputError("no re-embedding is running")
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM knowledge_chunks c WHERE NOT EXISTS"
                    " (SELECT 1 FROM reembed_vectors r WHERE r.chunk_id = c.id)"
                )
            ).fetchone()
            missing = int(row[0]) if row else 0
            if missing:
                raise InvalidInputError(
                    f"{missing} chunks have no vector for {target.model!r} yet;"
                    " run `kotonoha kb reembed` to finish"
                )
            await conn.execute(
                "UPDATE knowledge_chunks SET embedding ="
                " (SELECT embedding FROM reembed_vectors r WHERE r.chunk_id = knowledge_chunks.id)"
            )
            await conn.execute("DELETE FROM reembed_vectors")
            await conn.execute(
                "DELETE FROM kotonoha_meta WHERE key IN ('reembed_model', 'reembed_dimension')"
            )
            await conn.executemany(
                "INSERT OR REPLACE INTO kotonoha_meta (key, value) VALUES (?, ?)",
                [("embedding_model", target.model), ("embedding_dimension", str(target.dimension))],
            )
            await self._refresh_all_status(conn)
        self._config = target
        self._cache = None  # reloaded with the new vectors on the next search
        return target

    @staticmethod
    async def _refresh_all_status(conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "UPDATE knowledge_sources SET status = "
            + SOURCE_STATUS_SQL.format(source="knowledge_sources.id")
        )

    async def abort_reembed(self) -> None:
        async with self._write("aborting the re-embedding") as conn:
            await conn.execute("DELETE FROM reembed_vectors")
            await conn.execute(
                "DELETE FROM kotonoha_meta WHERE key IN ('reembed_model', 'reembed_dimension')"
            )
