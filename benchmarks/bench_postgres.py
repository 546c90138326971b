"""The PostgreSQL backend alone: our code next to the same SQL sent raw, one table.

    .venv/bin/python -m benchmarks.bench_postgres --n 100000      # ~15 min on 2 cores
    .venv/bin/python -m benchmarks.bench_postgres --n 10000       # a quick run

Data: N seeded 1536-d vectors from the Gaussian mixture of ``benchmarks.data``
(normalised, clustered like real embeddings), queries from the same mixture. Rows
are dealt to three guilds: 79 %, 20 % and 1 % of the table.

Measured, in one run on one server (``benchmarks.pgserver``: PostgreSQL 18 +
pgvector, shared_buffers 1 GB, maintenance_work_mem 3 GB, or ``BENCH_DATABASE_URL``):

* bulk insert: ``save_source`` with 1000 chunks per call (validation, keyword
  document, binary COPY) against ``copy_records_to_table`` of the same prepared rows
  into an identical table, batch by batch alternately, both without the ANN index;
* the HNSW build (``rebuild_vector_index``) and its size;
* ``similarity_search`` p50/p99 through our code against the same statements sent
  raw over asyncpg on the same pool (for each query, the path our code took: the
  approximate statement with its SET LOCALs in a transaction, or the exact scan),
  and recall@10 against numpy's exact top 10 of the scope, for each guild with the
  default settings and with ``exact_search_max_rows=0`` (always the index).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from benchmarks.data import exact_top_k, make_dataset
from benchmarks.pgserver import bench_server
from benchmarks.util import pct, table
from kotonoha_bot.config import Settings
from kotonoha_bot.db.checks import check_filters
from kotonoha_bot.db.postgres.database import PostgreSQLDatabase
from kotonoha_bot.db.postgres.schema import ANN_INDEX_NAME
from kotonoha_bot.db.postgres.sql import exact_search_sql, vector_scope
from kotonoha_bot.models import EmbeddingConfig, KnowledgeChunk, KnowledgeSource
from kotonoha_bot.text import keyword_document

GUILD_SHARES = {1: 0.79, 2: 0.20, 3: 0.01}
TOP_K = 10
BATCH = 1000
DIM = 1536


@dataclass
class Case:
    name: str
    guild: int
    ann_only: bool
    ef_search: int | None = None
    ours: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    min_rows: int = 10**9
    paths: dict[str, int] = field(default_factory=dict)


def assign_guilds(n: int, seed: int = 7) -> np.ndarray:
    """79 % / 20 % / 1 % of the rows, dealt at random (seeded)."""
    order = np.random.default_rng(seed).permutation(n)
    guilds = np.empty(n, np.int64)
    start = 0
    for guild, share in GUILD_SHARES.items():
        count = n - start if guild == max(GUILD_SHARES) else round(n * share)
        guilds[order[start : start + count]] = guild
        start += count
    return guilds


def settings(**extra: Any) -> Settings:
    return Settings(_env_file=None, database_pool_min_size=2, **extra)  # type: ignore[call-arg]


async def execute(url: str, sql: str) -> Any:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def load(
    ours: PostgreSQLDatabase, raw_url: str, vectors: np.ndarray, guilds: np.ndarray
) -> dict[str, float]:
    """Insert every row through save_source and, alternately, raw COPY; time both."""
    import asyncpg
    from pgvector.asyncpg import register_vector

    raw = await asyncpg.connect(raw_url)
    await register_vector(raw)
    t_ours = t_raw = t_prep = 0.0
    rows = 0
    try:
        for guild in GUILD_SHARES:
            idx = np.flatnonzero(guilds == guild)
            for start in range(0, len(idx), BATCH):
                part = idx[start : start + BATCH]
                uri = f"bench/{guild}/{start}"
                chunks = [
                    KnowledgeChunk(
                        chunk_key=f"r{r}",
                        content=f"row {r} 東京 meeting",
                        chunk_index=i,
                        embedding=vectors[r],
                        metadata={"row": int(r)},
                    )
                    for i, r in enumerate(part)
                ]
                # The raw side: its source row is created off the clock; building the
                # same rows (keyword document, JSON) is timed apart from the COPY.
                source_id = await raw.fetchval(
                    "INSERT INTO knowledge_sources (guild_id, source_type, uri, title, status,"
                    " metadata, created_at, updated_at) VALUES ($1, 'document', $2, $2,"
                    " 'ready', '{}', now(), now()) RETURNING id",
                    guild,
                    uri,
                )
                created = datetime.now(UTC)
                t = time.perf_counter()
                records = [
                    (
                        source_id,
                        guild,
                        None,
                        c.chunk_index,
                        c.chunk_key,
                        c.content,
                        keyword_document(c.content),
                        json.dumps(c.metadata),
                        c.embedding,
                        created,
                    )
                    for c in chunks
                ]
                t_prep += time.perf_counter() - t
                t = time.perf_counter()
                await ours.save_source(KnowledgeSource(guild_id=guild, uri=uri, title=uri), chunks)
                t_ours += time.perf_counter() - t
                t = time.perf_counter()
                async with raw.transaction():
                    await raw.copy_records_to_table(
                        "knowledge_chunks",
                        records=records,
                        columns=[
                            "source_id",
                            "guild_id",
                            "channel_id",
                            "chunk_index",
                            "chunk_key",
                            "content",
                            "search_text",
                            "metadata",
                            "embedding",
                            "created_at",
                        ],
                    )
                t_raw += time.perf_counter() - t
                rows += len(part)
                if rows % 10_000 < BATCH:
                    print(f"  loaded {rows:,} rows", file=sys.stderr, flush=True)
    finally:
        await raw.close()
    return {"rows": rows, "ours_s": t_ours, "raw_s": t_raw, "prep_s": t_prep}


async def raw_search(
    db: PostgreSQLDatabase, guild: int, q: np.ndarray, wanted: Any, path: str
) -> tuple[float, list[int]]:
    """The statements our code sends on ``path``, sent raw on the same pool."""
    scope, params = vector_scope(q, guild, None, wanted)
    t = time.perf_counter()
    async with db._pool.acquire() as conn:
        if path in ("approximate", "exact_fallback"):
            guc, sql, limit = db.ann_statements(DIM, scope, len(params), TOP_K)
            async with conn.transaction(readonly=True):
                await conn.execute(guc)
                rows = await conn.fetch(sql, *params, limit, TOP_K)
        if path != "approximate":
            rows = await conn.fetch(exact_search_sql(scope, len(params) + 1), *params, TOP_K)
    return time.perf_counter() - t, [r["id"] for r in rows]


async def run_case(
    case: Case,
    url: str,
    vectors: np.ndarray,
    guilds: np.ndarray,
    row_of: dict[int, int],
    queries: np.ndarray,
    warmup: int,
) -> None:
    extra: dict[str, Any] = {"exact_search_max_rows": 0} if case.ann_only else {}
    if case.ef_search:
        extra["hnsw_ef_search"] = case.ef_search
    scope_rows = np.flatnonzero(guilds == case.guild).astype(np.int64)
    async with PostgreSQLDatabase(url, settings=settings(**extra)) as db:
        await db.get_embedding_config()
        wanted = check_filters(None)
        path = ""
        for i, q in enumerate(queries):
            # Alternate who goes first, so neither side always finds the pages warm
            # (a scope's path does not change between queries).
            if i % 2:
                t_raw, raw_ids = await raw_search(db, case.guild, q, wanted, path)
            before = dict(db.search_counts)
            t = time.perf_counter()
            hits = await db.similarity_search(q, guild_id=case.guild, top_k=TOP_K)
            t_ours = time.perf_counter() - t
            path = next(k for k, v in db.search_counts.items() if v != before.get(k, 0))
            if not i % 2:
                t_raw, raw_ids = await raw_search(db, case.guild, q, wanted, path)
            assert raw_ids == [h.chunk_id for h in hits]
            if i < warmup:
                continue
            case.ours.append(t_ours)
            case.raw.append(t_raw)
            case.paths[path] = case.paths.get(path, 0) + 1
            case.min_rows = min(case.min_rows, len(hits))
            truth = set(exact_top_k(vectors, scope_rows, q, TOP_K).tolist())
            found = {row_of[h.chunk_id] for h in hits}
            case.recalls.append(len(truth & found) / TOP_K)


async def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    ds = make_dataset(args.n, DIM, queries=args.queries + args.warmup, seed=args.seed)
    vectors, queries = ds.vectors, ds.queries
    guilds = assign_guilds(args.n, args.seed)
    print(f"data: {args.n:,} x {DIM} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    with bench_server() as server:
        info = await server.settings()
        ours_url = await server.create_database("pgbench_ours")
        raw_url = await server.create_database("pgbench_raw")
        try:
            for url in (ours_url, raw_url):
                async with PostgreSQLDatabase(url, settings=settings()) as db:
                    await db.set_embedding_config(EmbeddingConfig("bench", DIM))
                # Bulk loads go in without the graph, which is built once afterwards.
                await execute(url, f"DROP INDEX {ANN_INDEX_NAME}")
            async with PostgreSQLDatabase(ours_url, settings=settings()) as ours:
                loaded = await load(ours, raw_url, vectors, guilds)
                await server.drop_database(raw_url)
                print("building HNSW...", file=sys.stderr, flush=True)
                t = time.perf_counter()
                await ours.rebuild_vector_index()
                build_s = time.perf_counter() - t
            await execute(ours_url, "VACUUM ANALYZE knowledge_chunks")
            sizes = (
                await execute(
                    ours_url,
                    f"SELECT pg_relation_size(to_regclass('{ANN_INDEX_NAME}')) AS idx,"
                    " pg_total_relation_size('knowledge_chunks') AS tbl",
                )
            )[0]
            ids = await execute(ours_url, "SELECT id, chunk_key FROM knowledge_chunks")
            row_of = {int(r["id"]): int(r["chunk_key"][1:]) for r in ids}
            cases = [
                Case("guild 79% (default settings)", 1, False),
                Case("guild 20% (default settings)", 2, False),
                Case("guild 1% (default settings)", 3, False),
                Case("guild 20% (index only)", 2, True),
                Case("guild 1% (index only)", 3, True),
                # What recall costs: the largest guild at other ef_search values.
                Case("guild 79%, ef_search=40", 1, False, 40),
                Case("guild 79%, ef_search=200", 1, False, 200),
                Case("guild 79%, ef_search=400", 1, False, 400),
            ]
            for case in cases:
                print(f"searching: {case.name}", file=sys.stderr, flush=True)
                await run_case(case, ours_url, vectors, guilds, row_of, queries, args.warmup)
        finally:
            for url in (ours_url, raw_url):
                await server.drop_database(url)

    rows = []
    for c in cases:
        o50, o99, r50, r99 = (pct(c.ours, 50), pct(c.ours, 99), pct(c.raw, 50), pct(c.raw, 99))
        rows.append(
            [
                c.name,
                ", ".join(f"{k} {v}" for k, v in sorted(c.paths.items())),
                str(c.min_rows),
                f"{np.mean(c.recalls):.3f}",
                f"{min(c.recalls):.1f}",
                f"{o50 * 1e3:.2f}",
                f"{o99 * 1e3:.2f}",
                f"{r50 * 1e3:.2f}",
                f"{r99 * 1e3:.2f}",
                f"{o50 / r50:.2f}x / {(o50 - r50) * 1e3:+.2f} ms",
            ]
        )
    ours_rate = loaded["rows"] / loaded["ours_s"]
    raw_rate = loaded["rows"] / (loaded["raw_s"] + loaded["prep_s"])
    copy_rate = loaded["rows"] / loaded["raw_s"]
    print(
        f"\nPostgreSQL backend, N = {args.n:,} x {DIM} (seed {args.seed}),"
        f" {args.queries} queries per case after {args.warmup} warm-up, top_k = {TOP_K};"
        f" server {info.get('server_version')}, pgvector {info.get('pgvector')},"
        f" shared_buffers {info.get('shared_buffers')},"
        f" maintenance_work_mem {info.get('maintenance_work_mem')}\n"
    )
    print(
        table(
            [
                "case",
                "path (queries)",
                "min rows",
                "recall@10",
                "worst",
                "ours p50 ms",
                "ours p99 ms",
                "raw p50 ms",
                "raw p99 ms",
                "ours/raw p50",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            ["measure", "value"],
            [
                ["bulk insert, ours (save_source, 1000/call)", f"{ours_rate:,.0f} rows/s"],
                ["raw: build the same rows + COPY", f"{raw_rate:,.0f} rows/s"],
                ["raw: COPY of prepared rows only", f"{copy_rate:,.0f} rows/s"],
                ["ours / raw (build + COPY)", f"{ours_rate / raw_rate:.2f}x"],
                ["ours / raw (COPY only)", f"{ours_rate / copy_rate:.2f}x"],
                ["HNSW build (m=16, ef_construction=64)", f"{build_s:.1f} s"],
                ["HNSW index size", f"{sizes['idx'] / 2**20:,.0f} MiB"],
                ["knowledge_chunks total size", f"{sizes['tbl'] / 2**20:,.0f} MiB"],
                ["wall time", f"{time.perf_counter() - t0:.0f} s"],
            ],
        )
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--n", type=int, default=100_000, help="rows (default 100000)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per case")
    parser.add_argument("--warmup", type=int, default=20, help="untimed queries first")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
