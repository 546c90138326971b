"""PostgreSQL: knowledge sources and chunks (COPY-streamed), pending embeddings.

A source and its chunks are one transaction; a chunk names its source's guild
(checked before writing), so knowledge never crosses guilds. Pending chunks are
claimed with a lease (SKIP LOCKED) so two workers never embed the same row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from kotonoha_bot.db.checks import (
    check_chunk_scope,
    check_chunks,
    check_ids,
    check_limit,
    check_source,
    check_vector,
    require_config,
    source_status,
)
from kotonoha_bot.db.postgres.connection import (
    _CHUNK_COPY_COLS,
    _SOURCE_COLS,
    BULK_REBUILD_MIN_ROWS,
    CLAIM_LEASE_SECONDS,
    MAINTENANCE_TIMEOUT_SECONDS,
    Conn,
    _pgvec,
    _to_numpy,
)
from kotonoha_bot.db.postgres.index import PostgresIndex
from kotonoha_bot.db.postgres.schema import (
    ANN_INDEX_NAME,
)
from kotonoha_bot.db.postgres.sql import Params
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
    Vector,
)
from kotonoha_bot.text import (
    check_text,
    keyword_document,
)

if TYPE_CHECKING:
    pass


def _source(r: Any) -> KnowledgeSource:
    return KnowledgeSource(
        source_id=r["id"],
        guild_id=r["guild_id"],
        channel_id=r["channel_id"],
        source_type=r["source_type"],
        uri=r["uri"],
        title=r["title"],
        content_hash=r["content_hash"],
        status=r["status"],
        metadata=json.loads(r["metadata"]),
        session_key=r["session_key"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


class PostgresKnowledge(PostgresIndex):
    """Mixed into :class:`~kotonoha_bot.db.postgres.database.PostgreSQLDatabase`."""

    if TYPE_CHECKING:  # provenance (db/postgres/provenance.py), mixed in beside this

        async def _chunk_message_ids(
            self, conn: Conn, chunk_ids: Sequence[int]
        ) -> dict[int, tuple[int, ...]]: ...
        async def _missing_messages(
            self, conn: Conn, chunks: Sequence[KnowledgeChunk]
        ) -> set[int]: ...
        async def _link_chunks(
            self, conn: Conn, source_id: int, chunks: Sequence[KnowledgeChunk]
        ) -> None: ...

    # --- knowledge ------------------------------------------------------------

    async def save_source(
        self, source: KnowledgeSource, chunks: Sequence[KnowledgeChunk]
    ) -> KnowledgeSource:
        where = f"source {source.uri!r}"

        async def body(conn: Conn) -> KnowledgeSource:
            config = await self._read_config(conn)
            # The source now; its chunks while they stream to the server (one bad chunk
            # aborts the COPY and the transaction: nothing is kept).
            check_source(source, [], None)
            require_config(config, any(c.embedding is not None for c in chunks), where)
            check_chunk_scope(source.guild_id, chunks, where)
            status = source_status(chunks)
            row = await conn.fetchrow(
                "INSERT INTO knowledge_sources AS s (guild_id, channel_id, source_type, uri,"
                " title, content_hash, status, metadata, session_key, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, now(), now())"
                " ON CONFLICT (guild_id, uri) DO UPDATE SET channel_id = EXCLUDED.channel_id,"
                " source_type = EXCLUDED.source_type, title = EXCLUDED.title,"
                " content_hash = EXCLUDED.content_hash, status = EXCLUDED.status,"
                " metadata = EXCLUDED.metadata, session_key = EXCLUDED.session_key,"
                " updated_at = EXCLUDED.updated_at"
                f" RETURNING {_SOURCE_COLS}",
                source.guild_id,
                source.channel_id,
                source.source_type,
                source.uri,
                source.title,
                source.content_hash,
                status,
                canonical_json(source.metadata),
                source.session_key,
            )
            source_id = int(row["id"])
            await conn.execute("DELETE FROM knowledge_chunks WHERE source_id = $1", source_id)
            await self._copy_chunks(
                conn, source_id, source.guild_id, source.channel_id, chunks, config, where
            )
            return _source(row)

        saved = await self._run(f"saving {where}", body, write=True)
        self._scope_sizes.clear()
        await self._maybe_build_ivfflat()
        return saved

    async def ensure_source(self, source: KnowledgeSource) -> KnowledgeSource:
        check_source(source, [], None)

        async def body(conn: Conn) -> KnowledgeSource:
            # A concurrent creator makes our INSERT wait, then do nothing; the SELECT
            # (a new snapshot under READ COMMITTED) sees its row.
            row = await conn.fetchrow(
                "INSERT INTO knowledge_sources (guild_id, channel_id, source_type, uri, title,"
                " content_hash, status, metadata, session_key, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, 'ready', $7::jsonb, $8, now(), now())"
                f" ON CONFLICT (guild_id, uri) DO NOTHING RETURNING {_SOURCE_COLS}",
                source.guild_id,
                source.channel_id,
                source.source_type,
                source.uri,
                source.title,
                source.content_hash,
                canonical_json(source.metadata),
                source.session_key,
            )
            if row is None:
                row = await conn.fetchrow(
                    f"SELECT {_SOURCE_COLS} FROM knowledge_sources"
                    " WHERE guild_id = $1 AND uri = $2",
                    source.guild_id,
                    source.uri,
                )
            return _source(row)

        return await self._run(f"creating source {source.uri!r}", body, write=True)

    async def _copy_chunks(
        self,
        conn: Conn,
        source_id: int,
        guild_id: int,
        channel_id: int | None,
        chunks: Sequence[KnowledgeChunk],
        config: EmbeddingConfig | None,
        validate: str | None = None,
    ) -> int:
        """Bulk insert (binary COPY) chunks known to be new.

        With ``validate`` (the "where" of error messages) each chunk is checked with
        the shared rules as it is sent; otherwise the caller has checked them.
        """
        missing = await self._missing_messages(conn, chunks)
        if missing:
            # A message of its window was deleted meanwhile: never store that chunk.
            chunks = [c for c in chunks if missing.isdisjoint(c.message_ids)]
        if not chunks:
            return 0
        now = datetime.now(UTC)
        dim = config.dimension if config else None

        # A generator, not a list: asyncpg sends each buffer as soon as it fills, so the
        # server ingests rows while Python is still checking and tokenising the next.
        def records() -> Iterator[tuple[Any, ...]]:
            seen: set[str] = set()
            for c in chunks:
                if validate is not None:
                    check_chunks([c], dim, validate)
                    if c.chunk_key in seen:
                        raise InvalidInputError(
                            f"{validate} chunk {c.chunk_index} ({c.chunk_key!r}):"
                            " duplicate chunk_key"
                        )
                    seen.add(c.chunk_key)
                yield (
                    source_id,
                    guild_id,
                    c.channel_id if c.channel_id is not None else channel_id,
                    c.chunk_index,
                    c.chunk_key,
                    c.content,
                    keyword_document(c.content),
                    canonical_json(c.metadata),
                    None if c.embedding is None else np.asarray(c.embedding, dtype=np.float32),
                    now,
                )

        embedded = sum(1 for c in chunks if c.embedding is not None)
        rebuild = await self._drop_index_for_bulk_load(conn, embedded, config)
        await conn.copy_records_to_table(
            "knowledge_chunks",
            records=records(),
            columns=_CHUNK_COPY_COLS,
            timeout=MAINTENANCE_TIMEOUT_SECONDS,
        )
        await self._link_chunks(conn, source_id, chunks)
        if rebuild is not None:
            await self._create_ann_index(conn, rebuild)
        return len(chunks)

    async def _drop_index_for_bulk_load(
        self, conn: Conn, embedded: int, config: EmbeddingConfig | None
    ) -> int | None:
        """Drop the ANN index before a bulk load that at least doubles the vectors.

        Inserting into HNSW costs milliseconds per 1536-d row, several times more than
        building the index over the same rows, so a batch at least as large as what is
        stored is loaded without the index and the index is rebuilt in the same
        transaction (searches wait for it). Returns the dimension to rebuild with.
        """
        if embedded < BULK_REBUILD_MIN_ROWS or config is None:
            return None
        stored = int(
            await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks"
                " WHERE embedding IS NOT NULL LIMIT $1) AS s",
                embedded + 1,
            )
        )
        if stored > embedded:
            return None
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ANN_INDEX_NAME):
            return None
        await conn.execute(f"DROP INDEX {ANN_INDEX_NAME}")
        return config.dimension

    async def add_chunks(self, source_id: int, chunks: Sequence[KnowledgeChunk]) -> int:
        check_ids("add_chunks", source_id)

        async def body(conn: Conn) -> int:
            # Locking the source row serialises concurrent add_chunks on one source.
            row = await conn.fetchrow(
                "SELECT guild_id, channel_id, uri FROM knowledge_sources WHERE id = $1 FOR UPDATE",
                source_id,
            )
            if row is None:
                raise NotFoundError(f"knowledge source {source_id} does not exist")
            where = f"source {row['uri']!r}"
            config = await self._read_config(conn)
            check_chunks(chunks, config.dimension if config else None, where)
            require_config(config, any(c.embedding is not None for c in chunks), where)
            check_chunk_scope(row["guild_id"], chunks, where)
            existing = {
                r["chunk_key"]
                for r in await conn.fetch(
                    "SELECT chunk_key FROM knowledge_chunks"
                    " WHERE source_id = $1 AND chunk_key = ANY($2::text[])",
                    source_id,
                    [c.chunk_key for c in chunks],
                )
            }
            new = [c for c in chunks if c.chunk_key not in existing]
            added = await self._copy_chunks(
                conn, source_id, row["guild_id"], row["channel_id"], new, config
            )
            if added:
                await self._refresh_status(conn, [source_id])
            return added

        added = await self._run(f"adding chunks to source {source_id}", body, write=True)
        if added:
            self._scope_sizes.clear()
            await self._maybe_build_ivfflat()
        return added

    async def set_source_hash(self, source_id: int, content_hash: str) -> bool:
        check_ids("set_source_hash", source_id)
        check_text(content_hash, "content_hash")

        async def body(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE knowledge_sources SET content_hash = $1, updated_at = now() WHERE id = $2",
                content_hash,
                source_id,
            )
            return bool(status != "UPDATE 0")

        return await self._run(f"recording the hash of source {source_id}", body, write=True)

    @staticmethod
    async def _refresh_status(conn: Conn, source_ids: Sequence[int]) -> None:
        if not source_ids:
            return
        await conn.execute(
            "UPDATE knowledge_sources s SET updated_at = now(), status = "
            + SOURCE_STATUS_SQL.format(source="s.id")
            + " WHERE s.id = ANY($1::bigint[])",
            list(source_ids),
        )

    async def get_source(self, source_id: int) -> KnowledgeSource | None:
        check_ids("get_source", source_id)

        async def body(conn: Conn) -> KnowledgeSource | None:
            row = await conn.fetchrow(
                f"SELECT {_SOURCE_COLS} FROM knowledge_sources WHERE id = $1", source_id
            )
            return None if row is None else _source(row)

        return await self._run(f"reading source {source_id}", body)

    async def find_source(self, guild_id: int, uri: str) -> KnowledgeSource | None:
        check_ids("find_source", guild_id)

        async def body(conn: Conn) -> KnowledgeSource | None:
            row = await conn.fetchrow(
                f"SELECT {_SOURCE_COLS} FROM knowledge_sources WHERE guild_id = $1 AND uri = $2",
                guild_id,
                uri,
            )
            return None if row is None else _source(row)

        return await self._run(f"finding source {uri!r}", body)

    async def list_sources(
        self, *, guild_id: int | None = None, status: str | None = None
    ) -> list[KnowledgeSource]:
        check_ids("list_sources", guild_id)
        where: list[str] = []
        params = Params()
        if guild_id is not None:
            where.append(f"guild_id = {params.add(guild_id)}")
        if status is not None:
            where.append(f"status = {params.add(status)}")
        sql = f"SELECT {_SOURCE_COLS} FROM knowledge_sources"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"

        async def body(conn: Conn) -> list[KnowledgeSource]:
            return [_source(r) for r in await conn.fetch(sql, *params)]

        return await self._run("listing sources", body)

    async def delete_source(self, source_id: int) -> bool:
        check_ids("delete_source", source_id)

        async def body(conn: Conn) -> bool:
            status = await conn.execute("DELETE FROM knowledge_sources WHERE id = $1", source_id)
            return bool(status != "DELETE 0")

        existed = await self._run(f"deleting source {source_id}", body, write=True)
        self._scope_sizes.clear()
        return existed

    async def list_chunks(self, source_id: int) -> list[KnowledgeChunk]:
        check_ids("list_chunks", source_id)

        async def body(conn: Conn) -> list[KnowledgeChunk]:
            rows = await conn.fetch(
                "SELECT id, source_id, guild_id, channel_id, chunk_index, chunk_key, content,"
                " metadata, embedding FROM knowledge_chunks WHERE source_id = $1"
                " ORDER BY chunk_index, id",
                source_id,
            )
            links = await self._chunk_message_ids(conn, [int(r["id"]) for r in rows])
            return [
                KnowledgeChunk(
                    chunk_id=r["id"],
                    source_id=r["source_id"],
                    guild_id=r["guild_id"],
                    channel_id=r["channel_id"],
                    chunk_index=r["chunk_index"],
                    chunk_key=r["chunk_key"],
                    content=r["content"],
                    metadata=json.loads(r["metadata"]),
                    embedding=None if r["embedding"] is None else _to_numpy(r["embedding"]),
                    message_ids=links.get(int(r["id"]), ()),
                )
                for r in rows
            ]

        return await self._run(f"listing chunks of source {source_id}", body)

    async def pending_chunks(self, limit: int = 100) -> list[PendingChunk]:
        if check_limit(limit, "pending_chunks") == 0:
            return []

        async def body(conn: Conn) -> list[PendingChunk]:
            # Claim with a lease: a second worker skips these rows (SKIP LOCKED while we
            # update, claimed_until afterwards); a crashed worker's rows come back later.
            rows = await conn.fetch(
                "UPDATE knowledge_chunks c"
                f" SET claimed_until = now() + interval '{CLAIM_LEASE_SECONDS} seconds'"
                " FROM (SELECT id FROM knowledge_chunks WHERE embedding IS NULL"
                "       AND (claimed_until IS NULL OR claimed_until < now())"
                "       ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) AS p"
                " WHERE c.id = p.id RETURNING c.id, c.source_id, c.content",
                limit,
            )
            return sorted(
                (
                    PendingChunk(chunk_id=r["id"], source_id=r["source_id"], content=r["content"])
                    for r in rows
                ),
                key=lambda p: p.chunk_id,
            )

        return await self._run("claiming chunks awaiting embeddings", body, write=True)

    async def set_chunk_embeddings(self, items: Sequence[tuple[int, Vector]]) -> int:
        check_ids("set_chunk_embeddings", *(i for i, _ in items))

        async def body(conn: Conn) -> int:
            config = await self._read_config(conn)
            if config is None and items:
                raise InvalidInputError(
                    "no embedding model recorded in this database yet;"
                    " call set_embedding_config before writing vectors"
                )
            dim = config.dimension if config else None
            checked = {int(cid): check_vector(v, dim, f"chunk {cid}") for cid, v in items}
            if not checked:
                return 0
            # Lock the sources first (in id order): two workers finishing disjoint chunks
            # of one source would otherwise each judge it from a snapshot without the
            # other's vectors and leave it 'pending' for ever. After the lock, this
            # transaction's next statements see what the other committed.
            await conn.execute(
                "SELECT s.id FROM knowledge_sources s WHERE s.id IN"
                " (SELECT c.source_id FROM knowledge_chunks c WHERE c.id = ANY($1::bigint[]))"
                " ORDER BY s.id FOR UPDATE OF s",
                list(checked),
            )
            rows = await conn.fetch(
                "UPDATE knowledge_chunks c SET embedding = v.embedding, claimed_until = NULL"
                " FROM unnest($1::bigint[], $2::vector[]) AS v(id, embedding)"
                " WHERE c.id = v.id RETURNING c.source_id",
                list(checked),
                [_pgvec(v) for v in checked.values()],
            )
            await self._refresh_status(conn, sorted({int(r["source_id"]) for r in rows}))
            return len(rows)

        updated = await self._run("storing embeddings", body, write=True)
        if updated:
            self._scope_sizes.clear()
            await self._maybe_build_ivfflat()
        return updated
