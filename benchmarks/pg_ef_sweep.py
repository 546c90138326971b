"""Where a PostgreSQL vector search spends its time, by ef_search (issue 16, round 3).

    .venv/bin/python -m benchmarks.pg_ef_sweep --n 100000 --dim 384 --ef 24,40,56,64,100
    .venv/bin/python -m benchmarks.pg_ef_sweep --n 10000 --dim 384 --graphs 24/128,32/128

Builds one data set (``benchmarks/data.py``) the way ``python -m benchmarks`` does
(our ``save_source`` in batches with the IVFFlat setting, then ``rebuild_vector_index()``
for HNSW, then ``VACUUM ANALYZE``) on a throwaway server (``benchmarks/pgserver.py``),
and for each ef_search runs the raw index query (``ORDER BY`` the halfvec expression,
``LIMIT 10``, one guild) over the queries, printing:

- the client's p50 (one asyncpg connection, the statement prepared once),
- the server's own execution time (``EXPLAIN (ANALYZE, BUFFERS, TIMING OFF)``: the
  graph walk without the round trip and the client), p50 and min,
- the index and heap pages it touched (shared buffer hits, p50), and
- recall@10 against numpy's exact top 10.

``--graphs m/ef_construction,...`` builds the HNSW graph again with each and sweeps each
(one data set; the index and heap buffers are the cost that does not depend on the
host's load). It also prints the table's heap and TOAST sizes (are the vectors read in place?). The
difference between the client's and the server's time is what the round trip and the
host's scheduling cost; on a shared 2-core host it grows with the load. The ef_search
table in ``kotonoha_bot/db/postgres/search_plan.py`` was chosen from this output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from typing import Any

import numpy as np

from benchmarks.bench_sqlite import fill, row_of, settings
from benchmarks.data import GUILD_ID, ground_truth, make_dataset, recall
from benchmarks.pgserver import bench_server
from benchmarks.systems import BATCH

_EXEC = re.compile(r"Execution Time: ([\d.]+)")
_HITS = re.compile(r"shared hit=(\d+)")


async def sweep(
    server: Any,
    n: int,
    dim: int,
    efs: list[int],
    queries: int,
    graphs: list[tuple[int, int]] | None = None,
) -> None:
    import asyncpg
    from pgvector.asyncpg import register_vector

    from kotonoha_bot.db import open_database

    ds = make_dataset(n, dim, queries, 42)
    truth = ground_truth(ds, "100%")
    url = await server.create_database("sweep")
    try:
        t = time.perf_counter()
        ivf = settings(database_type="postgres", database_url=url, vector_index_type="ivfflat")
        async with open_database(url, settings=ivf) as db:
            await fill(db, ds, BATCH)
        print(f"{n:,} x {dim}: loaded in {time.perf_counter() - t:.0f} s", flush=True)
        conn = await asyncpg.connect(
            url, server_settings={"jit": "off", "hnsw.iterative_scan": "relaxed_order"}
        )
        try:
            await register_vector(conn)
            await conn.execute("VACUUM ANALYZE knowledge_chunks")
            sizes = await conn.fetchrow(
                "SELECT pg_relation_size(oid) AS heap, pg_relation_size(reltoastrelid) AS toast"
                " FROM pg_class WHERE oid = 'knowledge_chunks'::regclass"
            )
            print(f"heap {sizes['heap'] / 2**20:,.0f} MiB, TOAST {sizes['toast'] / 2**20:,.0f} MiB")
            key = f"(l2_normalize(c.embedding)::halfvec({dim}))"
            sql = (
                "SELECT c.content FROM knowledge_chunks c WHERE c.guild_id = $2"
                f" ORDER BY {key} <=> (l2_normalize($1::vector)::halfvec({dim})) LIMIT 10"
            )
            for m, ef_construction in graphs or [(24, 128)]:
                hnsw = settings(
                    database_type="postgres",
                    database_url=url,
                    vector_index_type="hnsw",
                    hnsw_m=m,
                    hnsw_ef_construction=ef_construction,
                )
                async with open_database(url, settings=hnsw) as db:
                    t_index = time.perf_counter()
                    await db.rebuild_vector_index()
                    built = time.perf_counter() - t_index
                await conn.execute("VACUUM ANALYZE knowledge_chunks")
                index_bytes = await conn.fetchval(
                    "SELECT pg_relation_size('knowledge_chunks_embedding_ann_idx')"
                )
                print(
                    f"HNSW m={m} ef_construction={ef_construction}: built in {built:.0f} s,"
                    f" {index_bytes / 2**20:,.1f} MiB",
                    flush=True,
                )
                await _sweep_efs(conn, sql, ds, truth, n, dim, efs, f"m={m}/{ef_construction}")
        finally:
            await conn.close()
    finally:
        await server.drop_database(url)


async def _sweep_efs(
    conn: Any, sql: str, ds: Any, truth: Any, n: int, dim: int, efs: list[int], graph: str
) -> None:
    """One graph: each ef_search over the queries (client, server, buffers, recall)."""
    for ef in efs:
        await conn.execute(f"SET hnsw.ef_search = {int(ef)}")
        for q in ds.queries[:3]:
            await conn.fetch(sql, q, GUILD_ID)
        wall, server_ms, hits, found = [], [], [], []
        for q in ds.queries:
            t = time.perf_counter()
            rows = await conn.fetch(sql, q, GUILD_ID)
            wall.append(time.perf_counter() - t)
            found.append([row_of(r["content"]) for r in rows])
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + sql, q, GUILD_ID
                )
            )
            server_ms.append(float(_EXEC.search(plan).group(1)))  # type: ignore[union-attr]
            hits.append(int(_HITS.search(plan).group(1)))  # type: ignore[union-attr]
        rec = np.mean([recall(f, t) for f, t in zip(found, truth, strict=True)])
        print(
            f"{n:,} x {dim} {graph} ef_search={ef}: client p50"
            f" {np.median(wall) * 1e3:.2f} ms"
            f" | server p50 {np.median(server_ms):.2f} ms, min {min(server_ms):.2f} ms"
            f" | buffers p50 {np.median(hits):.0f} | recall@10 {rec:.3f}"
            f" | load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pg_ef_sweep", description=__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--ef", default="24,40,56,64,100", help="comma-separated ef_search values")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument(
        "--graphs", default="24/128", help="comma-separated m/ef_construction HNSW builds"
    )
    args = p.parse_args(argv)
    efs = [int(e) for e in str(args.ef).split(",") if e]
    graphs = [
        (int(g.split("/")[0]), int(g.split("/")[1])) for g in str(args.graphs).split(",") if g
    ]
    print(" ".join(["python -m benchmarks.pg_ef_sweep", *sys.argv[1:]]), flush=True)
    with bench_server() as server:
        asyncio.run(sweep(server, args.n, args.dim, efs, args.queries, graphs))


if __name__ == "__main__":
    main()
