"""PostgreSQL's levers at 100k rows next to Chroma, in one process (issue 16, round 5).

    .venv/bin/python -m benchmarks.pg_levers [1536a 384 1536b 1536c]   # LEV_N=100000

One data set per width (``benchmarks/data.py``, 50 queries, whole guild), loaded the way
``python -m benchmarks`` loads it, with Chroma built on the same vectors. Phases:

- ``1536a`` / ``384``: the halfvec HNSW graph (m=24, ef_construction=128, the product's
  default), then, side by side: Chroma at ef 20/40/100; ours (``similarity_search``) at
  auto and ef_search 32/40/48/64; the bare index query (``LIMIT 10``) and our SQL by hand
  (candidates 10/15/20 re-sorted by exact distance) with ``EXPLAIN (ANALYZE, BUFFERS)``
  server time and buffers; then a binary-quantised HNSW index
  (``binary_quantize(embedding)::bit(N)``, ``bit_hamming_ops``) with an exact re-rank by
  candidates and ef_search, and the Hamming ranking without the graph (a sequential scan:
  how good the codes alone are).
- ``1536b``: the same graph built again (another random draw), same rounds.
- ``1536c``: m=24, ef_construction=256, same rounds.
- ``graph=M/EFC`` (any number of them, after or instead of the above): a 1536 graph
  with those parameters, same rounds (the first one is the initial build when
  ``1536a`` is not asked for).

``LEV_CHROMA=0`` leaves Chroma out (graph questions only). Every line carries the time
and the 1-minute load: on a shared 2-core host compare only lines of one run, close in
time.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_sqlite import fill, row_of, settings
from benchmarks.data import GUILD_ID, ground_truth, make_dataset, recall
from benchmarks.pgserver import bench_server
from benchmarks.systems import BATCH, Chroma

N = int(os.environ.get("LEV_N", "100000"))
Q = 50
_EXEC = re.compile(r"Execution Time: ([\d.]+)")
_HITS = re.compile(r"shared hit=(\d+)")
IDX = "knowledge_chunks_embedding_ann_idx"
HIT_COLS = (
    "c.id, c.source_id, c.content, c.guild_id, c.channel_id, c.metadata, c.chunk_index,"
    " k.title, k.uri"
)
T0 = time.time()


def say(*a: Any) -> None:
    print(
        f"[{time.strftime('%H:%M:%S', time.gmtime())} load {os.getloadavg()[0]:.2f}]",
        *a,
        flush=True,
    )


def p50(xs: list[float]) -> float:
    return float(np.median(xs)) * 1e3


async def run_sql(conn: Any, sql: str, args_of, ds, truth, explain: bool = True) -> str:
    stmt = await conn.prepare(sql)
    for q in ds.queries[:3]:
        await stmt.fetch(*args_of(q))
    wall, rec = [], []
    for q, t in zip(ds.queries, truth, strict=True):
        s = time.perf_counter()
        rows = await stmt.fetch(*args_of(q))
        wall.append(time.perf_counter() - s)
        rec.append(recall([row_of(r["content"]) for r in rows], t))
    out = f"client p50 {p50(wall):.2f} ms | recall@10 {np.mean(rec):.3f}"
    stuck = [f"q{i}:{r:.1f}" for i, r in enumerate(rec) if r < 0.7]
    if stuck:  # queries the walk left in the wrong part of the graph
        out += f" | stuck {' '.join(stuck)}"
    if explain:
        srv, hits = [], []
        for q in ds.queries[:20]:
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + sql, *args_of(q)
                )
            )
            srv.append(float(_EXEC.search(plan).group(1)))
            hits.append(int(_HITS.search(plan).group(1)))
        out += f" | server p50 {np.median(srv):.2f} ms, buffers p50 {np.median(hits):.0f}"
    return out


async def run_ours(url: str, ds, truth, ef: int | None) -> str:
    from kotonoha_bot.db import open_database

    extra: dict[str, Any] = {"vector_index_type": "hnsw"}
    if ef is not None:
        extra["hnsw_ef_search"] = ef
    db = open_database(url, settings=settings(database_type="postgres", database_url=url, **extra))
    await db.initialize()
    try:
        for q in ds.queries[:3]:
            await db.similarity_search(q, guild_id=GUILD_ID, top_k=10)
        wall, rec = [], []
        for q, t in zip(ds.queries, truth, strict=True):
            s = time.perf_counter()
            hits = await db.similarity_search(q, guild_id=GUILD_ID, top_k=10)
            wall.append(time.perf_counter() - s)
            rec.append(recall([row_of(h.content) for h in hits], t))
        return f"client p50 {p50(wall):.2f} ms | recall@10 {np.mean(rec):.3f}"
    finally:
        await db.close()


async def run_chroma(ch: Chroma | None, ds, truth, efs=(20, 40, 100)) -> None:
    if ch is None:  # LEV_CHROMA=0
        return
    for ef in efs:
        await ch.use(f"hnsw ef_search={ef}")
        for q in ds.queries[:3]:
            ch.search_sync(q, None)
        wall, rec = [], []
        for q, t in zip(ds.queries, truth, strict=True):
            s = time.perf_counter()
            rows = ch.search_sync(q, None)
            wall.append(time.perf_counter() - s)
            rec.append(recall(rows, t))
        say(
            f"  {ds.dim} chroma ef={ef}: client p50 {p50(wall):.2f} ms"
            f" | recall@10 {np.mean(rec):.3f}"
        )


def halfvec_sqls(dim: int) -> tuple[str, str]:
    key = f"(l2_normalize(c.embedding)::halfvec({dim}))"
    qk = f"(l2_normalize($1::vector)::halfvec({dim}))"
    bare = (
        "SELECT c.content FROM knowledge_chunks c WHERE c.guild_id = $2"
        f" ORDER BY {key} <=> {qk} LIMIT 10"
    )
    ours = (
        f"SELECT r.dist, {HIT_COLS} FROM ("
        "  SELECT c.id, c.embedding <=> $1::vector AS dist FROM knowledge_chunks c"
        "  WHERE c.guild_id = $2"
        f"  ORDER BY {key} <=> {qk}"
        "  LIMIT $3"
        ") AS r JOIN knowledge_chunks c ON c.id = r.id"
        " JOIN knowledge_sources k ON k.id = c.source_id"
        " ORDER BY r.dist, r.id LIMIT 10"
    )
    return bare, ours


def binary_sql(dim: int) -> str:
    return (
        f"SELECT r.dist, {HIT_COLS} FROM ("
        "  SELECT c.id, c.embedding <=> $1::vector AS dist FROM knowledge_chunks c"
        "  WHERE c.guild_id = $2"
        f"  ORDER BY binary_quantize(c.embedding)::bit({dim})"
        f" <~> binary_quantize($1::vector)::bit({dim})"
        "  LIMIT $3"
        ") AS r JOIN knowledge_chunks c ON c.id = r.id"
        " JOIN knowledge_sources k ON k.id = c.source_id"
        " ORDER BY r.dist, r.id LIMIT 10"
    )


async def halfvec_round(conn, url, ds, truth, ch, tag: str, efs=(32, 40, 48, 64)) -> None:
    dim = ds.dim
    bare, ours = halfvec_sqls(dim)
    await run_chroma(ch, ds, truth)
    say(f"  {dim} {tag} ours auto: {await run_ours(url, ds, truth, None)}")
    for ef in efs:
        say(f"  {dim} {tag} ours ef={ef}: {await run_ours(url, ds, truth, ef)}")
    for ef in efs:
        await conn.execute(f"SET hnsw.ef_search = {ef}")
        r = await run_sql(conn, bare, lambda q: (q, GUILD_ID), ds, truth)
        say(f"  {dim} {tag} bare ef={ef}: {r}")
        for lim in (10, 15, 20):
            r = await run_sql(conn, ours, lambda q, lim=lim: (q, GUILD_ID, lim), ds, truth)
            say(f"  {dim} {tag} oursql ef={ef} cand={lim}: {r}")
    await run_chroma(ch, ds, truth, efs=(40,))


async def build_halfvec(conn, dim: int, m: int, efc: int) -> float:
    await conn.execute(f"DROP INDEX IF EXISTS {IDX}")
    t = time.perf_counter()
    await conn.execute(
        f"CREATE INDEX {IDX} ON knowledge_chunks USING hnsw"
        f" ((l2_normalize(embedding)::halfvec({dim})) halfvec_cosine_ops)"
        f" WITH (m = {m}, ef_construction = {efc})"
    )
    await conn.execute("VACUUM ANALYZE knowledge_chunks")
    return time.perf_counter() - t


async def binary_round(conn, ds, truth, m=24, efc=128) -> None:
    dim = ds.dim
    await conn.execute("DROP INDEX IF EXISTS knowledge_chunks_bq_idx")
    t = time.perf_counter()
    await conn.execute(
        "CREATE INDEX knowledge_chunks_bq_idx ON knowledge_chunks USING hnsw"
        f" ((binary_quantize(embedding)::bit({dim})) bit_hamming_ops)"
        f" WITH (m = {m}, ef_construction = {efc})"
    )
    await conn.execute("VACUUM ANALYZE knowledge_chunks")
    size = await conn.fetchval("SELECT pg_relation_size('knowledge_chunks_bq_idx')")
    say(
        f"  {dim} binary index (m={m}, efc={efc}) built in {time.perf_counter() - t:.0f} s,"
        f" size {size / 2**20:.0f} MiB"
    )
    sql = binary_sql(dim)
    for cand in (40, 80, 160, 320, 640, 1000):
        for ef in sorted({min(1000, max(40, cand)), min(1000, max(40, cand * 2))}):
            await conn.execute(f"SET hnsw.ef_search = {ef}")
            r = await run_sql(conn, sql, lambda q, c=cand: (q, GUILD_ID, c), ds, truth)
            say(f"  {dim} binary cand={cand} ef={ef}: {r}")
    # the codes alone, exact (no graph): how good is Hamming ranking on this data?
    exact = (
        "SELECT c.content FROM (SELECT id, embedding <=> $1::vector AS dist FROM knowledge_chunks"
        f" WHERE guild_id = $2 ORDER BY binary_quantize(embedding)::bit({dim}) <~>"
        f" binary_quantize($1::vector)::bit({dim}) LIMIT $3) r"
        " JOIN knowledge_chunks c ON c.id = r.id"
        " ORDER BY r.dist LIMIT 10"
    )
    await conn.execute("SET enable_indexscan = off")
    for cand in (40, 160, 640, 2000):
        r = await run_sql(conn, exact, lambda q, c=cand: (q, GUILD_ID, c), ds, truth, explain=False)
        say(f"  {dim} binary EXACT hamming (seq scan) cand={cand}: {r}")
    await conn.execute("RESET enable_indexscan")
    await conn.execute("DROP INDEX knowledge_chunks_bq_idx")
    await conn.execute("VACUUM ANALYZE knowledge_chunks")


async def prepare(server, dim: int, workdir: Path, m: int = 24, efc: int = 128):
    import asyncpg
    from pgvector.asyncpg import register_vector

    from kotonoha_bot.db import open_database

    ds = make_dataset(N, dim, Q, 42)
    truth = ground_truth(ds, "100%")
    url = await server.create_database(f"lev{dim}")
    ivf = settings(database_type="postgres", database_url=url, vector_index_type="ivfflat")
    t = time.perf_counter()
    async with open_database(url, settings=ivf) as db:
        await fill(db, ds, BATCH)
    say(f"{dim}: loaded in {time.perf_counter() - t:.0f} s")
    conn = await asyncpg.connect(
        url, server_settings={"jit": "off", "hnsw.iterative_scan": "relaxed_order"}
    )
    await register_vector(conn)
    ch: Chroma | None = Chroma() if os.environ.get("LEV_CHROMA", "1") != "0" else None
    chroma_task = asyncio.create_task(
        asyncio.to_thread(lambda: ch and asyncio.run(ch.build(ds, workdir / f"c{dim}")))
    )
    secs = await build_halfvec(conn, dim, m, efc)
    say(f"{dim}: halfvec HNSW m={m} efc={efc} build #1 in {secs:.0f} s")
    t = time.perf_counter()
    await chroma_task
    say(f"{dim}: chroma built (waited {time.perf_counter() - t:.0f} s more)")
    return ds, truth, url, conn, ch


async def main() -> None:
    which = sys.argv[1:] or ["1536a", "384", "1536b", "1536c"]
    workdir = Path(
        tempfile.mkdtemp(
            prefix="lev",
        )
    )
    say("start", which)
    graphs = [tuple(int(x) for x in w.split("=")[1].split("/")) for w in which if "=" in w]
    with bench_server() as server:
        first = graphs[0] if graphs and "1536a" not in which else (24, 128)
        ds, truth, url, conn, ch = await prepare(server, 1536, workdir, *first)
        if "1536a" in which:
            await halfvec_round(conn, url, ds, truth, ch, "build#1 m24/128")
            await binary_round(conn, ds, truth)
        if "384" in which:
            d3 = await prepare(server, 384, workdir)
            await halfvec_round(d3[3], d3[2], d3[0], d3[1], d3[4], "build#1 m24/128")
            await binary_round(d3[3], d3[0], d3[1])
            await d3[3].close()
            if d3[4] is not None:
                await d3[4].close()
        if "1536b" in which:
            secs = await build_halfvec(conn, 1536, 24, 128)
            say(f"1536: halfvec HNSW m=24 efc=128 build #2 in {secs:.0f} s")
            await halfvec_round(conn, url, ds, truth, ch, "build#2 m24/128")
        if "1536c" in which:
            secs = await build_halfvec(conn, 1536, 24, 256)
            say(f"1536: halfvec HNSW m=24 efc=256 build in {secs:.0f} s")
            await halfvec_round(conn, url, ds, truth, ch, "build#3 m24/256")
        for i, (m, efc) in enumerate(graphs):
            if i or first != (m, efc):
                secs = await build_halfvec(conn, 1536, m, efc)
                say(f"1536: halfvec HNSW m={m} efc={efc} build in {secs:.0f} s")
            await halfvec_round(conn, url, ds, truth, ch, f"graph m{m}/{efc}")
        await conn.close()
        if ch is not None:
            await ch.close()
    say("done")


if __name__ == "__main__":
    asyncio.run(main())
