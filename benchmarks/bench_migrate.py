"""`kotonoha db migrate` at scale: a bot's whole SQLite database into PostgreSQL.

    .venv/bin/python -m benchmarks.bench_migrate              # 100k chunks x 1536 + 500k messages
    .venv/bin/python -m benchmarks.bench_migrate --scale 0.1  # a quick run (10 %)

Source (built once, not timed as part of the migration): a SQLite file of the current
schema with ``10_000 x scale`` sessions of 50 messages (Japanese text with emoji) and
``100_000 x scale`` knowledge chunks in sources of 100, each with a normalised float32
embedding of ``--dim`` dimensions. The schema and the embedding model are created
through the contract; the rows are bulk-inserted with sqlite3 (FTS5 triggers on).

Measured: ``transfer.migrate`` end to end, exactly what ``kotonoha db migrate`` runs:
integrity check, online backup, key-ordered batches (COPY), id sequences, the HNSW
build (``rebuild_vector_index``), then the full verification (every row re-read from
both sides and compared by checksum, every vector bit for bit). The server is
``benchmarks.pgserver`` (PostgreSQL 18 + pgvector, shared_buffers 1 GB,
maintenance_work_mem 3 GB) or ``BENCH_DATABASE_URL``. Prints one table and rewrites
the "Benchmark" section of docs/MIGRATION.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.pgserver import bench_server
from benchmarks.util import machine, table
from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.models import EmbeddingConfig
from kotonoha_bot.text import keyword_document
from kotonoha_bot.transfer.copy import migrate
from kotonoha_bot.transfer.reports import MigrationReport, TransferProgress

SESSIONS = 10_000
MESSAGES_PER_SESSION = 50
CHUNKS = 100_000
CHUNKS_PER_SOURCE = 100
DOC = Path(__file__).resolve().parent.parent / "docs" / "MIGRATION.md"
BEGIN, END = "<!-- bench-migrate:begin -->", "<!-- bench-migrate:end -->"
T0 = "2026-01-16T09:30:15.000000+00:00"
LINES = [
    "こんにちは、ことのは！今日の会議は15時からです🌸",
    "東京都の猫カフェについて教えてください。",
    "The deploy finished; please check the dashboard 👍",
    "明日の天気は晴れのち曇り、降水確率は二十パーセント。",
    "リリースノートを日本語と英語で用意しました。",
]


class Timeline(TransferProgress):
    """Remembers when each step began and ended (the benchmark's phase timings)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[tuple[float, str]] = []
        self.spans: dict[str, list[float]] = {}

    def begin(self, task: str, total: int | None) -> None:
        self.spans[task] = [time.perf_counter(), 0.0]

    def end(self, task: str) -> None:
        if task in self.spans:
            self.spans[task][1] = time.perf_counter()

    def note(self, message: str) -> None:
        self.marks.append((time.perf_counter(), message))
        print(f"  {time.perf_counter() - self.t0:7.1f}s  {message}", file=sys.stderr, flush=True)

    def between(self, first: str, then: str) -> float:
        """Seconds from the note starting with ``first`` to the next starting with ``then``."""
        start = next((t for t, m in self.marks if m.startswith(first)), None)
        if start is None:
            return float("nan")
        end = next((t for t, m in self.marks if t > start and m.startswith(then)), None)
        return float("nan") if end is None else end - start


def build_source(path: Path, scale: float, dim: int, seed: int = 42) -> dict[str, int]:
    """Bulk-load the source file; returns the row counts."""
    n_sessions = max(1, int(SESSIONS * scale))
    n_chunks = max(CHUNKS_PER_SOURCE, int(CHUNKS * scale))
    n_sources = -(-n_chunks // CHUNKS_PER_SOURCE)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO sessions (session_key, session_type, status, guild_id, channel_id,"
        " user_id, version, message_count, created_at, last_active_at)"
        " VALUES (?, 'mention', 'active', 1, ?, ?, 1, ?, ?, ?)",
        [
            (f"mention:{10**17 + i}", 10**17 + i % 97, 10**17 + i, MESSAGES_PER_SESSION, T0, T0)
            for i in range(n_sessions)
        ],
    )
    for i in range(n_sessions):
        conn.executemany(
            "INSERT INTO messages (session_key, seq, role, content, author_id, author_name,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    f"mention:{10**17 + i}",
                    j,
                    "user" if j % 2 == 0 else "assistant",
                    f"{LINES[(i + j) % len(LINES)]} ({i}/{j})",
                    10**17 + i if j % 2 == 0 else None,
                    "さくら" if j % 2 == 0 else None,
                    T0,
                )
                for j in range(MESSAGES_PER_SESSION)
            ],
        )
    conn.executemany(
        "INSERT INTO knowledge_sources (id, guild_id, source_type, uri, title, status,"
        " metadata, created_at, updated_at) VALUES (?, 1, 'document', ?, ?, 'ready', ?, ?, ?)",
        [
            (s + 1, f"docs/資料{s}.md", f"資料 {s}", '{"lang":"ja","tags":["a","b"]}', T0, T0)
            for s in range(n_sources)
        ],
    )
    rng = np.random.default_rng(seed)
    batch = 5000
    for start in range(0, n_chunks, batch):
        n = min(batch, n_chunks - start)
        vecs = rng.standard_normal((n, dim), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        rows = []
        for k in range(n):
            i = start + k
            content = f"{LINES[i % len(LINES)]} {LINES[(i * 7) % len(LINES)]} #{i}"
            rows.append(
                (
                    i // CHUNKS_PER_SOURCE + 1,
                    10 + i % 10,
                    i % CHUNKS_PER_SOURCE,
                    f"chunk-{i}",
                    content,
                    keyword_document(content),
                    f'{{"heading":"§{i % 7}","n":{i}}}',
                    vecs[k].astype("<f4").tobytes(),
                    T0,
                )
            )
        conn.executemany(
            "INSERT INTO knowledge_chunks (source_id, guild_id, channel_id, chunk_index,"
            " chunk_key, content, search_text, metadata, embedding, created_at)"
            " VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r[0], *r[1:]) for r in rows],
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {
        "sessions": n_sessions,
        "messages": n_sessions * MESSAGES_PER_SESSION,
        "knowledge_sources": n_sources,
        "knowledge_chunks": n_chunks,
    }


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "—"


def render(
    report: MigrationReport,
    timeline: Timeline,
    counts: dict[str, int],
    args: argparse.Namespace,
    source_bytes: int,
    target_bytes: int,
    build_seconds: float,
) -> str:
    total_rows = sum(t.moved for t in report.tables.values())
    assert report.verify is not None
    verify_s = report.verify.seconds
    index_s = timeline.between("building the vector index", "verifying")
    backup_s = timeline.between("backing up", "fixing") - sum(
        t.seconds for t in report.tables.values()
    )
    rows = [
        [t.table, f"{t.moved:,}", f"{t.seconds:.1f}", rate(t.moved, t.seconds)]
        for t in report.tables.values()
        if t.moved or t.table != "reembed_vectors"
    ]
    copy_s = sum(t.seconds for t in report.tables.values())
    rows.append(
        ["**all tables (copy)**", f"{total_rows:,}", f"{copy_s:.1f}", rate(total_rows, copy_s)]
    )
    phases = [
        ["integrity check + online backup + reading the small tables", f"{backup_s:.1f}"],
        [f"copy (COPY in batches of {args.batch_size} rows)", f"{copy_s:.1f}"],
        ["HNSW index build (rebuild_vector_index)", f"{index_s:.1f}"],
        ["verification (every row, every vector bit for bit)", f"{verify_s:.1f}"],
        ["**total, `migrate` end to end**", f"**{report.seconds:.1f}**"],
    ]
    m = machine()
    cmd = "python -m benchmarks.bench_migrate " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a != "--no-write"
    )
    lines = [
        BEGIN,
        "",
        f"Command: `{cmd.strip()}` — source: {counts['sessions']:,} sessions x"
        f" {MESSAGES_PER_SESSION} messages, {counts['knowledge_chunks']:,} chunks x"
        f" {args.dim} dims in {counts['knowledge_sources']:,} sources; SQLite file"
        f" {source_bytes / 2**20:,.0f} MiB (built in {build_seconds:.0f} s, not counted)."
        " Target: PostgreSQL 18 + pgvector (`benchmarks.pgserver`), database"
        f" {target_bytes / 2**20:,.0f} MiB afterwards (with the HNSW index).",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['memory']}, {m['os']}, Python {m['python']}."
        f" Load average during the run: {args.load[0]:.1f} at the start, {args.load[1]:.1f} at"
        " the end (the host is shared; other jobs ran at the same time).",
        "",
        table(["table", "rows", "seconds", "rows/s"], rows),
        "",
        table(["phase", "seconds"], phases),
        "",
        f"End to end: {total_rows / report.seconds:,.0f} rows/s including verification;"
        f" verified identical: {report.verify.identical}"
        f" ({sum(t.vectors_compared for t in report.verify.tables.values()):,} vectors"
        " compared bit for bit).",
        "",
        END,
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(head + section + tail, encoding="utf-8")
    else:
        DOC.write_text(text.rstrip() + "\n\n" + section + "\n", encoding="utf-8")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="kotonoha-bench-migrate-") as tmp:
        work = Path(tmp)
        settings = Settings(_env_file=None, backup_dir=work / "backups")  # type: ignore[call-arg]
        src = work / "source.db"
        async with open_database(f"sqlite:///{src}", settings=settings) as db:
            await db.set_embedding_config(EmbeddingConfig("text-embedding-3-small", args.dim))
        print(f"building the source (scale {args.scale}) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        counts = await asyncio.to_thread(build_source, src, args.scale, args.dim)
        build_seconds = time.perf_counter() - t
        source_bytes = src.stat().st_size
        print(f"  built in {build_seconds:.0f} s: {counts}", file=sys.stderr, flush=True)
        with bench_server() as server:
            url = await server.create_database("migrate")
            try:
                load_start = os.getloadavg()[0]
                timeline = Timeline()
                report = await migrate(
                    f"sqlite:///{src}",
                    url,
                    settings=settings,
                    batch_size=args.batch_size,
                    progress=timeline,
                )
                args.load = (load_start, os.getloadavg()[0])
                import asyncpg

                conn = await asyncpg.connect(url)
                try:
                    target_bytes = int(
                        await conn.fetchval("SELECT pg_database_size(current_database())")
                    )
                finally:
                    await conn.close()
            finally:
                await server.drop_database(url)
    section = render(report, timeline, counts, args, source_bytes, target_bytes, build_seconds)
    print(section)
    if not args.no_write:
        write_doc(section)
        print(f"wrote {DOC}", file=sys.stderr)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of 100k chunks/10k sessions")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--no-write", action="store_true", help="do not rewrite docs/MIGRATION.md")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
