"""Where "ours" PostgreSQL search time goes next to the raw SQL (issue 16, round 5).

    .venv/bin/python -m benchmarks.pg_gap --n 10000 --dim 1536

The side-by-side run (``python -m benchmarks``) measured ours at ef_search=auto slower in
its "defaults" phase than the ef_search sweep's row at the same ef. This builds one
data set (our SQLite int4 and our PostgreSQL, as ``python -m benchmarks`` does) and
answers the two questions that matter, each in one loop so the host's load changes hit
every condition alike:

1. **Decomposition of one search**, conditions shuffled per query: the raw SQL
   (``RawPostgres``: content, ``LIMIT 10``), ``SELECT 1`` (the round trip), our
   statement on the raw pool and on our pool, ``_search_rows`` (ours without building
   hits) and ``similarity_search``; p50 each and the ratio to the raw SQL, plus the
   search path counts (``approximate_set_local`` > 0 would mean extra round trips).
2. **Does the group a search is interleaved with change it?** Phases of the benchmark's
   own ``interleaved`` (100 % scope) with [SQLite int4, ours, raw], [ours, raw] and
   [a memory sweep the size of SQLite's codes, ours, raw] and, when the ``bench`` extra
   is installed, [Chroma, ours, raw], alternated ``--reps`` times; the median of each
   phase's p50, the server's CPU seconds per PostgreSQL search (the whole server
   process tree: work done, not time waited for a core) and this process's CPU per
   query round less the round's own wall time in the non-PostgreSQL system (what is
   left burning: spinning worker threads would show here).

Every line carries the load average: on the shared 2-core host compare within a line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import __main__ as bm
from benchmarks.bench_sqlite import fill
from benchmarks.data import GUILD_ID, ground_truth, make_dataset
from benchmarks.pgserver import bench_server
from benchmarks.systems import (
    BATCH,
    TOP_K,
    Chroma,
    OursPostgres,
    OursSQLite,
    RawPostgres,
    System,
)


def _load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


class _MemorySweep(System):
    """Reads as many bytes as SQLite's int4 codes (cache pollution without a database)."""

    name = "memory sweep"
    blocking = False

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.array = np.ones(max(nbytes // 8, 1))

    async def search(self, q: np.ndarray, channel: int | None) -> list[int]:
        self.array.sum()
        return []


def _server_cpu_s(pid: int | None) -> float:
    import psutil

    if pid is None:
        return float("nan")
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


async def decompose(ours: OursPostgres, raw: RawPostgres, ds: Any, reps: int) -> None:
    from kotonoha_bot.db.postgres.search import _hit
    from kotonoha_bot.db.postgres.sql import vector_scope

    db = ours.db
    config = db._config
    scope, params = vector_scope(ds.queries[0], GUILD_ID, None, {})
    _, statement, limit = db.ann_statements(ds.dim, scope, len(params), TOP_K)
    conds: dict[str, Any] = {
        "raw SQL": lambda q: raw.search(q, None),
        "SELECT 1": lambda q: raw.pool.fetchval("SELECT 1"),
        "our statement, raw pool": lambda q: raw.pool.fetch(statement, q, GUILD_ID, limit, TOP_K),
        "our statement, our pool": lambda q: db._pool.fetch(statement, q, GUILD_ID, limit, TOP_K),
        "ours without hits": lambda q: db._search_rows(config, q, GUILD_ID, None, TOP_K, {}),
        "ours similarity_search": lambda q: ours.search(q, None),
    }
    for q in ds.queries:  # warm: statements prepared, scope size cached
        for f in conds.values():
            await f(q)
    secs: dict[str, list[float]] = {c: [] for c in conds}
    rng = random.Random(3)
    for _ in range(reps):
        for q in ds.queries:
            order = list(conds)
            rng.shuffle(order)
            for c in order:
                t = time.perf_counter()
                await conds[c](q)
                secs[c].append(time.perf_counter() - t)
    base = float(np.median(secs["raw SQL"]))
    print(f"1. one search, {ds.n:,} x {ds.dim}, {reps} x {len(ds.queries)} queries ({_load()})")
    for c, v in secs.items():
        print(f"   {c}: p50 {np.median(v) * 1e3:.2f} ms ({np.median(v) / base:.2f}x raw)")
    rows = await db._search_rows(config, ds.queries[0], GUILD_ID, None, TOP_K, {})
    t = time.perf_counter()
    for _ in range(1000):
        [_hit(r, 1.0 - float(r["dist"]), similarity=True) for r in rows]
    print(f"   building {len(rows)} SearchHits: {time.perf_counter() - t:.3f} ms per search")
    print(f"   search paths: {dict(db.search_counts)}", flush=True)


async def groups(
    sq: OursSQLite,
    ours: OursPostgres,
    raw: RawPostgres,
    ds: Any,
    reps: int,
    pid: int | None,
    chroma: System | None,
) -> None:
    truth = {"100%": ground_truth(ds, "100%")}
    junk = _MemorySweep(ds.n * ds.dim // 2)
    phases: dict[str, list[System]] = {
        "[SQLite int4, ours, raw]": [sq, ours, raw],
        "[ours, raw]": [ours, raw],
        "[memory sweep, ours, raw]": [junk, ours, raw],
    }
    if chroma is not None:
        phases["[Chroma, ours, raw]"] = [chroma, ours, raw]
    p50: dict[str, dict[str, list[float]]] = {g: {"ours": [], "raw": []} for g in phases}
    cpu: dict[str, list[float]] = {g: [] for g in phases}
    client: dict[str, list[float]] = {g: [] for g in phases}
    scopes, bm.SCOPES = bm.SCOPES, {"100%": None}
    try:
        for _ in range(reps):
            for g, systems in phases.items():
                c0, t0 = _server_cpu_s(pid), time.process_time()
                out = await bm.interleaved(systems, ds, truth, g)
                rounds = len(ds.queries) + bm.WARMUP
                cpu[g].append((_server_cpu_s(pid) - c0) / (2 * rounds))
                other = sum(
                    out[s.name]["100%"]["mean"] for s in systems if s not in (ours, raw)
                ) * len(ds.queries)
                client[g].append((time.process_time() - t0 - other) / rounds)
                p50[g]["ours"].append(out[ours.name]["100%"]["p50"])
                p50[g]["raw"].append(out[raw.name]["100%"]["p50"])
    finally:
        bm.SCOPES = scopes
    print(f"2. interleaved phases, median of {reps} p50s ({_load()})")
    for g in phases:
        print(
            f"   {g}: ours {np.median(p50[g]['ours']) * 1e3:.2f} ms,"
            f" raw {np.median(p50[g]['raw']) * 1e3:.2f} ms;"
            f" server CPU per PostgreSQL search {np.median(cpu[g]) * 1e3:.2f} ms;"
            f" client CPU per round beyond the other system {np.median(client[g]) * 1e3:.2f} ms",
            flush=True,
        )


async def run(server: Any, args: argparse.Namespace) -> None:
    from kotonoha_bot.db import open_database

    ds = make_dataset(args.n, args.dim, args.queries, 42)
    with tempfile.TemporaryDirectory(prefix="kotonoha-pg-gap-") as tmp:
        sq = OursSQLite("int4")
        await sq.build(ds, Path(tmp))
        ours = OursPostgres(server)
        ours.rows, ours.dim = ds.n, ds.dim
        ours.url = await server.create_database("gap")
        try:
            async with open_database(ours.url, settings=ours._settings("ivfflat")) as db:
                await fill(db, ds, BATCH)
            async with open_database(ours.url, settings=ours._settings("hnsw")) as db:
                await db.rebuild_vector_index()
            await ours.analyze()
            raw = RawPostgres(ours)
            await ours.use(ours.default_variant())
            await raw.use(raw.default_variant())
            chroma: System | None = None
            try:
                import chromadb  # noqa: F401

                chroma = Chroma()
                await chroma.build(ds, Path(tmp))
                await chroma.use(chroma.default_variant())
            except ImportError:
                chroma = None
            try:
                await decompose(ours, raw, ds, args.reps)
                await groups(sq, ours, raw, ds, args.reps, server.pid, chroma)
            finally:
                if chroma is not None:
                    await chroma.close()
                await ours.db.close()
                await raw.close()
                await sq.close()
        finally:
            await server.drop_database(ours.url)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pg_gap", description=__doc__)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args(argv)
    print(" ".join(["python -m benchmarks.pg_gap", *sys.argv[1:]]), flush=True)
    with bench_server() as server:
        asyncio.run(run(server, args))


if __name__ == "__main__":
    main()
