"""The SQLite backend's vector search (default cache kind), against this host's memory bandwidth.

    .venv/bin/python -m benchmarks.bench_sqlite --sizes 10000,100000 --dim 1536 --queries 50

For each N it fills a fresh database through the public contract (``save_source`` in
batches of 1000 chunks), then measures, in one process: search latency over the whole
guild and over a 1 % channel, the time to load the vector cache from a file evicted
from the page cache (close, evict, reopen, first search), and the memory the cache
takes. The bound is N x dim x 4 bytes at numpy's best read bandwidth, measured in the
same run. Prints one table and rewrites the "SQLite backend" section of
docs/PERFORMANCE.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import GUILD_ID, SCOPES, Dataset, ground_truth, make_dataset, recall
from benchmarks.util import (
    best_bandwidth,
    evict_from_page_cache,
    files_bytes,
    machine,
    mib,
    ms,
    pct,
    read_bandwidth,
    rss_bytes,
    table,
)
from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.models import EmbeddingConfig, KnowledgeChunk, KnowledgeSource

BATCH = 1000
TOP_K = 10
P99_BUDGET_S = 0.050  # a reply should not wait longer than this for retrieval
NAS_CACHE_BUDGET = 1 << 30  # 1 GiB of a small NAS's RAM for the bot's vector cache
DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- sqlite-backend:begin -->", "<!-- sqlite-backend:end -->"

_WORDS = tuple(
    [
        "会話",
        "記憶",
        "サーバー",
        "チャンネル",
        "設定",
        "質問",
        "回答",
        "ゲーム",
        "音楽",
        "イベント",
        "予定",
        "画像",
        "リンク",
        "投票",
        "bot",
        "memory",
        "server",
        "channel",
        "setting",
        "question",
        "answer",
        "game",
        "music",
        "event",
        "schedule",
        "image",
        "link",
        "vote",
        "python",
        "docker",
        "backup",
        "restore",
        "search",
        "vector",
        "database",
        "session",
        "thread",
    ]
)


def chunk_text(row: int) -> str:
    """Deterministic text for a row; it starts with the row number so hits map back."""
    rng = np.random.default_rng(row)
    words = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), 40))
    return f"row {row}: {words}"


def row_of(content: str) -> int:
    """The row number a hit's text was made for."""
    return int(content[4 : content.index(":")])


def settings(**overrides: Any) -> Settings:
    """Defaults without reading .env or the environment's DATABASE_* (benchmarks are explicit)."""
    values: dict[str, Any] = {"database_type": "sqlite", **overrides}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def fill(db: DatabaseProtocol, ds: Dataset, batch: int = BATCH) -> float:
    """Insert all rows through ``save_source`` (one source per batch); seconds taken."""
    await db.set_embedding_config(EmbeddingConfig("bench-synthetic", ds.dim))
    t = time.perf_counter()
    for b, start in enumerate(range(0, ds.n, batch)):
        stop = min(start + batch, ds.n)
        chunks = [
            KnowledgeChunk(
                chunk_key=f"r{i}",
                content=chunk_text(i),
                chunk_index=i - start,
                embedding=ds.vectors[i],
                channel_id=int(ds.channels[i]),
            )
            for i in range(start, stop)
        ]
        source = KnowledgeSource(guild_id=GUILD_ID, uri=f"bench://batch/{b}", title=f"batch {b}")
        await db.save_source(source, chunks)
    return time.perf_counter() - t


@dataclass
class Latencies:
    """Per-query seconds and the recall@k against exact ground truth."""

    seconds: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return pct(self.seconds, 50)

    @property
    def p99(self) -> float:
        return pct(self.seconds, 99)

    @property
    def recall(self) -> float:
        return float(np.mean(self.recalls)) if self.recalls else float("nan")


async def search_once(db: DatabaseProtocol, q: np.ndarray, scope: str) -> list[int]:
    hits = await db.similarity_search(q, guild_id=GUILD_ID, channel_id=SCOPES[scope], top_k=TOP_K)
    return [row_of(h.content) for h in hits]


async def measure(
    db: DatabaseProtocol, ds: Dataset, scope: str, truth: list[np.ndarray], warmup: int = 3
) -> Latencies:
    """Sequential queries (one client); recall against ``truth``."""
    for q in ds.queries[:warmup]:
        await search_once(db, q, scope)
    out = Latencies()
    for q, t in zip(ds.queries, truth, strict=True):
        start = time.perf_counter()
        rows = await search_once(db, q, scope)
        out.seconds.append(time.perf_counter() - start)
        out.recalls.append(recall(rows, t))
    return out


async def concurrent_qps(
    db: DatabaseProtocol, ds: Dataset, scope: str, clients: int = 8, rounds: int = 1
) -> float:
    """Queries per second with ``clients`` coroutines sharing the queries."""
    queries = list(ds.queries) * rounds

    async def client(part: list[np.ndarray]) -> None:
        for q in part:
            await search_once(db, q, scope)

    parts = [queries[i::clients] for i in range(clients)]
    start = time.perf_counter()
    await asyncio.gather(*(client(p) for p in parts))
    return len(queries) / (time.perf_counter() - start)


@dataclass
class SQLiteResult:
    n: int
    dim: int
    vector_bytes: int
    bound_s: float
    full: Latencies
    one_pct: Latencies
    ten_pct: Latencies | None
    insert_s: float
    cold_load_s: float
    warm_load_s: float
    cache_bytes: int | None
    rss_delta: int
    disk_bytes: int
    qps1: float = float("nan")
    qps8: float = float("nan")


async def bench_size(
    ds: Dataset, workdir: Path, bandwidth: float, *, ten_pct: bool = False, qps: bool = False
) -> SQLiteResult:
    """Everything Task A measures for one N (``ten_pct``/``qps`` add what Task B needs)."""
    path = workdir / f"sqlite-{ds.n}.db"
    url = f"sqlite:///{path}"
    async with open_database(url, settings=settings()) as db:
        insert_s = await fill(db, ds)
    disk = files_bytes(path.parent, path.name + "*")
    truth = {s: ground_truth(ds, s, TOP_K) for s in SCOPES}

    gc.collect()
    evict_from_page_cache(*path.parent.glob(path.name + "*"))
    rss0 = rss_bytes()
    async with open_database(url, settings=settings()) as db:
        start = time.perf_counter()
        await search_once(db, ds.queries[0], "100%")
        cold = time.perf_counter() - start
        gc.collect()
        rss_delta = rss_bytes() - rss0
        stats = await db.stats()
        cache_bytes = stats.details.get("vector_cache_bytes")
    # The same again with the file still in the page cache: what is left is our own work.
    async with open_database(url, settings=settings()) as db:
        start = time.perf_counter()
        await search_once(db, ds.queries[0], "100%")
        warm = time.perf_counter() - start
        full = await measure(db, ds, "100%", truth["100%"])
        one = await measure(db, ds, "1%", truth["1%"])
        ten = await measure(db, ds, "10%", truth["10%"]) if ten_pct else None
        result = SQLiteResult(
            n=ds.n,
            dim=ds.dim,
            vector_bytes=ds.n * ds.dim * 4,
            bound_s=ds.n * ds.dim * 4 / bandwidth,
            full=full,
            one_pct=one,
            ten_pct=ten,
            insert_s=insert_s,
            cold_load_s=cold,
            warm_load_s=warm,
            cache_bytes=cache_bytes,
            rss_delta=rss_delta,
            disk_bytes=disk,
        )
        if qps:
            result.qps1 = len(ds.queries) / sum(full.seconds)
            result.qps8 = await concurrent_qps(db, ds, "100%", clients=8)
    return result


HEADERS = [
    "N",
    "vectors MiB",
    "bound ms",
    "p50 ms",
    "p99 ms",
    "p50 / bound",
    "1% p50 ms",
    "1% p99 ms",
    "1% / full",
    "recall@10",
    "cold load s",
    "warm load s",
    "insert chunks/s",
    "cache MiB",
    "RSS Δ MiB",
    "file MiB",
]


def rows(results: list[SQLiteResult]) -> list[list[str]]:
    out = []
    for r in results:
        out.append(
            [
                f"{r.n:,}",
                mib(r.vector_bytes),
                ms(r.bound_s),
                ms(r.full.p50),
                ms(r.full.p99),
                f"{r.full.p50 / r.bound_s:.2f}x",
                ms(r.one_pct.p50),
                ms(r.one_pct.p99),
                f"{100 * r.one_pct.p50 / r.full.p50:.1f}%",
                f"{min(r.full.recall, r.one_pct.recall):.3f}",
                f"{r.cold_load_s:.2f}",
                f"{r.warm_load_s:.2f}",
                f"{r.n / r.insert_s:,.0f}",
                mib(r.cache_bytes),
                mib(r.rss_delta),
                mib(r.disk_bytes),
            ]
        )
    return out


def crossover(results: list[SQLiteResult], dim: int) -> dict[str, float]:
    """N where p99 reaches the budget (linear in N from the largest size) and the cache 1 GiB."""
    big = max(results, key=lambda r: r.n)
    per_row_s = big.full.p99 / big.n
    per_row_bytes = (big.cache_bytes or big.n * dim * 4) / big.n
    return {
        "n_p99_budget": P99_BUDGET_S / per_row_s,
        "n_cache_budget": NAS_CACHE_BUDGET / per_row_bytes,
    }


def section(
    results: list[SQLiteResult], bw: dict[str, float], command: str, info: dict[str, str]
) -> str:
    """The Markdown of the "SQLite backend" section."""
    big = max(results, key=lambda r: r.n)
    cross = crossover(results, big.dim)
    ratio = big.full.p50 / big.bound_s
    goal = "met" if ratio <= 1.3 else "**missed**"
    scope_ratio = 100 * big.one_pct.p50 / big.full.p50
    scope_goal = "met" if scope_ratio <= 2 else "not met"
    small = min(results, key=lambda r: r.n)
    recommend = min(cross["n_p99_budget"], cross["n_cache_budget"])
    return f"""{BEGIN}
## SQLite backend

`SQLiteDatabase.similarity_search` through the public contract with the default vector
cache (`SQLITE_VECTOR_CACHE={_cache_kind()}`: codes in memory, the shortlist re-ranked by
exact float32 cosine from the stored vectors), {big.dim}-dim clustered vectors
(`benchmarks/data.py`), top-{TOP_K}, one client, {len(big.full.seconds)} queries per cell.
*bound* = N x {big.dim} x 4 bytes (reading float32 vectors once, what the exact cache
did) at numpy's best read bandwidth on this host, measured in the same run
({bw["best"] / 1e9:.1f} GB/s, the best of runs at the start and the end; sgemv
{bw["matvec"] / 1e9:.1f} GB/s, add.reduce {bw["add.reduce"] / 1e9:.1f} GB/s).
*1 %* = a channel holding 1 % of the guild's rows.
*cold load* = close, evict the file from the page cache (`posix_fadvise`), reopen,
first search; *warm load* = the same with the file still in the page cache (so the
rest is our own loading work). *RSS Δ* = process RSS after the cold first search minus
before reopening. p99 of {len(big.full.seconds)} queries is close to their maximum, so it
shows the machine's noise more than p50 does.

Machine: {info["cpu"]}, {info["nproc"]} cores, {info["memory"]} RAM, Python
{info["python"]}, numpy {info["numpy"]}, SQLite {sqlite_version()}. Shared and noisy
(other jobs ran at the same time), so read ratios rather than absolute times.

```
{command}
```

{table(HEADERS, rows(results))}

- Goal p50 <= 1.3x the bandwidth bound at {big.n:,}: **{ratio:.2f}x**, {goal}.
- A 1 % channel costs {scope_ratio:.1f} % of a full-guild search at {big.n:,}
  (goal ~1 %, {scope_goal}): a channel's rows are one contiguous block of the cache, so
  only they are scored, but every search pays a fixed cost (query validation, the lock,
  the thread hop, reading the shortlist's rows: a 1 % channel of {small.n:,} rows took
  {ms(small.one_pct.p50)} ms in all).
- The scan is linear in N: from these numbers p99 reaches
  {P99_BUDGET_S * 1000:.0f} ms at about **{cross["n_p99_budget"]:,.0f} chunks**, and
  the cache reaches 1 GiB (a generous share of a small NAS) at about
  **{cross["n_cache_budget"]:,.0f} chunks** ({big.dim} dims).
- Recommendation: stay on SQLite up to about **{_round_down(recommend):,} chunks**
  of {big.dim}-dim vectors in one guild; beyond that, or when several processes must
  share the database, use PostgreSQL (`DATABASE_TYPE=postgres`).
{END}"""


def _cache_kind() -> str:
    return str(Settings.model_fields["sqlite_vector_cache"].default)


def _round_down(n: float) -> int:
    step = 10 ** max(int(np.floor(np.log10(max(n, 1)))) - 1, 0)
    return int(n // step * step)


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def write_section(text: str, doc: Path = DOC) -> None:
    """Replace the section between the markers (or append it)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    old = doc.read_text() if doc.exists() else "# Performance\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + text + tail
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    doc.write_text(new)


async def main_async(args: argparse.Namespace) -> list[SQLiteResult]:
    print("measuring memory bandwidth ...", file=sys.stderr)
    bw_start = read_bandwidth(args.dim)
    results = []
    with tempfile.TemporaryDirectory(prefix="kotonoha-bench-") as tmp:
        for n in args.sizes:
            print(f"N={n:,}: generating, inserting, searching ...", file=sys.stderr)
            ds = make_dataset(n, args.dim, args.queries, args.seed)
            results.append(await bench_size(ds, Path(tmp), bw_start["best"]))
            del ds
            gc.collect()
    # Measured again at the end and the best kept: the host is shared, and the bound
    # must be what the hardware can do, not what a busy moment allowed.
    bw = best_bandwidth(bw_start, read_bandwidth(args.dim))
    results = [replace(r, bound_s=r.vector_bytes / bw["best"]) for r in results]
    print(table(HEADERS, rows(results)))
    cross = crossover(results, args.dim)
    print(
        f"\nbandwidth {bw['best'] / 1e9:.1f} GB/s; p99 hits {P99_BUDGET_S * 1000:.0f} ms at"
        f" ~{cross['n_p99_budget']:,.0f} chunks; cache hits 1 GiB at"
        f" ~{cross['n_cache_budget']:,.0f} chunks"
    )
    if args.write:
        command = ".venv/bin/python -m benchmarks.bench_sqlite " + shlex.join(sys.argv[1:])
        write_section(section(results, bw, command.strip(), machine()))
        print(f"wrote {DOC}", file=sys.stderr)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-write", dest="write", action="store_false", help="do not edit the doc")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    return args


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    main()
