"""The health server over real HTTP against a real SQLite database.

``/health`` is liveness (always 200 while the loop runs); ``/ready`` reflects the
database, the schema, Discord, and recovers by itself when the database returns.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml  # type: ignore[import-untyped]

from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.health import HealthServer, health_server_from_settings, latest_schema_version
from kotonoha_bot.models import KnowledgeChunk, KnowledgeSource


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.json()


@pytest.fixture
async def sqlite_db(tmp_path: Path, settings: Settings) -> AsyncIterator[DatabaseProtocol]:
    async with open_database(f"sqlite:///{tmp_path / 'health.db'}", settings=settings) as db:
        yield db


async def test_health_and_ready_on_sqlite(sqlite_db: DatabaseProtocol) -> None:
    async with HealthServer(sqlite_db, host="127.0.0.1", port=0) as server:
        assert server.port > 0
        status, body = await get(f"{server.url}/health")
        assert (status, body) == (200, {"status": "ok"})

        status, body = await get(f"{server.url}/ready")
        assert status == 200, body
        expected = await sqlite_db.schema_version()
        assert expected >= 1
        assert body["status"] == "ready"
        assert body["database"] == {
            "backend": "sqlite",
            "reachable": True,
            "schema_version": expected,
            "schema_expected": expected,
            "schema_current": True,
        }
        assert body["embedding_backlog"] == 0
        assert body["discord_connected"] is None


async def test_ready_follows_the_database_down_and_back(sqlite_db: DatabaseProtocol) -> None:
    async with HealthServer(sqlite_db, host="127.0.0.1", port=0) as server:
        assert (await get(f"{server.url}/ready"))[0] == 200

        await sqlite_db.close()
        status, body = await get(f"{server.url}/ready")
        assert status == 503
        assert body["database"]["reachable"] is False
        assert body["database"]["error"]  # an error class name, no details
        assert body["embedding_backlog"] is None
        # Liveness is unaffected: an outage must not get the bot restarted.
        assert (await get(f"{server.url}/health"))[0] == 200

        await sqlite_db.initialize()  # the database is back; same health server
        status, body = await get(f"{server.url}/ready")
        assert status == 200, body
        assert body["database"]["reachable"] is True


async def test_discord_state_gates_readiness(sqlite_db: DatabaseProtocol) -> None:
    connected = False
    async with HealthServer(
        sqlite_db, host="127.0.0.1", port=0, discord_ready=lambda: connected
    ) as server:
        status, body = await get(f"{server.url}/ready")
        assert status == 503
        assert body["discord_connected"] is False
        assert body["database"]["reachable"] is True
        connected = True
        status, body = await get(f"{server.url}/ready")
        assert status == 200
        assert body["discord_connected"] is True


async def test_a_failing_discord_callable_means_not_ready(sqlite_db: DatabaseProtocol) -> None:
    def broken() -> bool:
        raise RuntimeError("gateway state unknown")

    async with HealthServer(sqlite_db, host="127.0.0.1", port=0, discord_ready=broken) as server:
        status, body = await get(f"{server.url}/ready")
        assert status == 503
        assert body["discord_connected"] is False


async def test_schema_mismatch_is_not_ready(sqlite_db: DatabaseProtocol) -> None:
    current = await sqlite_db.schema_version()
    async with HealthServer(
        sqlite_db, host="127.0.0.1", port=0, expected_schema_version=current + 1
    ) as server:
        status, body = await get(f"{server.url}/ready")
        assert status == 503
        assert body["database"]["schema_current"] is False
        assert body["database"]["schema_expected"] == current + 1


async def test_backlog_counts_chunks_awaiting_embeddings(sqlite_db: DatabaseProtocol) -> None:
    source = KnowledgeSource(guild_id=1, uri="doc://a", title="a")
    chunks = [
        KnowledgeChunk(chunk_key=f"k{i}", content=f"text {i}", chunk_index=i) for i in range(3)
    ]
    await sqlite_db.save_source(source, chunks)
    async with HealthServer(sqlite_db, host="127.0.0.1", port=0, backlog_interval=0) as server:
        status, body = await get(f"{server.url}/ready")
        assert status == 200  # a backlog is reported, it does not make the bot unready
        assert body["embedding_backlog"] == 3


class SlowDatabase:
    """The real SQLite database behind a schema_version that takes ``delay`` seconds."""

    def __init__(self, db: DatabaseProtocol, delay: float) -> None:
        self._db = db
        self.delay = delay
        self.calls = 0
        self.backend_name = db.backend_name

    async def schema_version(self) -> int:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return await self._db.schema_version()

    async def stats(self) -> Any:
        return await self._db.stats()


async def test_a_hanging_database_times_out(sqlite_db: DatabaseProtocol) -> None:
    slow = SlowDatabase(sqlite_db, delay=30)
    server = HealthServer(slow, host="127.0.0.1", port=0, db_timeout=0.3)  # type: ignore[arg-type]
    async with server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await get(f"{server.url}/ready")
        assert status == 503
        assert body["database"]["error"] == "timeout"
        assert loop.time() - started < 5
        slow.delay = 0  # it recovers
        assert (await get(f"{server.url}/ready"))[0] == 200


async def test_concurrent_probes_share_one_check(sqlite_db: DatabaseProtocol) -> None:
    slow = SlowDatabase(sqlite_db, delay=0.5)
    server = HealthServer(slow, host="127.0.0.1", port=0, expected_schema_version=None)  # type: ignore[arg-type]
    async with server:
        results = await asyncio.gather(*(get(f"{server.url}/ready") for _ in range(10)))
        assert {status for status, _ in results} == {200}
        assert slow.calls < 10


async def test_stop_closes_the_port(sqlite_db: DatabaseProtocol) -> None:
    server = HealthServer(sqlite_db, host="127.0.0.1", port=0)
    await server.start()
    url = server.url
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{url}/health")


async def test_a_taken_port_fails_at_start(sqlite_db: DatabaseProtocol) -> None:
    async with HealthServer(sqlite_db, host="127.0.0.1", port=0) as first:
        second = HealthServer(sqlite_db, host="127.0.0.1", port=first.port)
        with pytest.raises(OSError):
            await second.start()


def test_from_settings(settings: Settings, tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'x.db'}", settings=settings)
    off = settings.model_copy(update={"health_port": 0})
    assert health_server_from_settings(db, off) is None
    on = settings.model_copy(update={"health_host": "127.0.0.1", "health_port": 18080})
    server = health_server_from_settings(db, on)
    assert server is not None
    assert (server.host, server.requested_port) == ("127.0.0.1", 18080)
    assert server.expected_schema_version == latest_schema_version(db)
    assert server.expected_schema_version is not None


ROOT = Path(__file__).resolve().parents[2]


def dockerfile_healthcheck() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK"))
    argv = json.loads(line.split(" CMD ", 1)[1])
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def compose_healthcheck(name: str) -> list[str]:
    data = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    test = data["services"]["kotonoha-bot"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [str(a) for a in test[1:]]


async def run_probe(argv: list[str], env: dict[str, str]) -> int:
    assert argv[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv[1:], env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 30)


async def test_container_probes_follow_the_endpoints(sqlite_db: DatabaseProtocol) -> None:
    """The exact commands in the Dockerfile and compose files, run against a live server."""
    connected = True
    async with HealthServer(
        sqlite_db, host="127.0.0.1", port=0, discord_ready=lambda: connected
    ) as server:
        liveness = dockerfile_healthcheck()
        env = {"HEALTH_PORT": str(server.port)}
        readiness = {
            name: [a.replace(":8080/", f":{server.port}/") for a in compose_healthcheck(name)]
            for name in ("docker-compose.yml", "docker-compose.sqlite.yml")
        }
        assert await run_probe(liveness, env) == 0
        for argv in readiness.values():
            assert await run_probe(argv, {}) == 0
        connected = False  # /ready -> 503: readiness probes fail, liveness does not
        assert await run_probe(liveness, env) == 0
        for argv in readiness.values():
            assert await run_probe(argv, {}) != 0
    # Server gone: every probe fails.
    assert await run_probe(liveness, env) != 0


@pytest.mark.parametrize(
    ("remote", "authorization", "token", "detailed"),
    [
        ("127.0.0.1", None, None, True),
        ("127.0.0.2", None, None, True),
        ("::1", None, None, True),
        ("::ffff:127.0.0.1", None, None, True),
        ("192.0.2.7", None, None, False),
        ("192.0.2.7", "Bearer s3cret-token", None, False),  # no token configured: no way in
        ("192.0.2.7", "Bearer s3cret-token", "s3cret-token", True),
        ("192.0.2.7", "bearer s3cret-token", "s3cret-token", True),
        ("192.0.2.7", "Bearer wrong", "s3cret-token", False),
        ("192.0.2.7", "Basic s3cret-token", "s3cret-token", False),
        (None, None, None, False),
        ("not-an-address", None, None, False),
    ],
)
def test_ready_details_only_for_loopback_or_the_token(
    remote: str | None, authorization: str | None, token: str | None, detailed: bool
) -> None:
    from kotonoha_bot.health import may_see_details

    assert may_see_details(remote, authorization, token) is detailed


async def test_ready_over_http_shows_details_to_loopback_only(
    sqlite_db: DatabaseProtocol,
) -> None:
    async with HealthServer(sqlite_db, host="127.0.0.1", port=0, token="tok-12345") as server:
        status, body = await get(f"{server.url}/ready")
        assert status == 200 and body["database"]["backend"] == "sqlite"  # loopback peer
        status, body = await get(f"{server.url}/health")
        assert body == {"status": "ok"}


def test_health_binds_loopback_by_default_everywhere(tmp_path: Path) -> None:
    assert Settings(_env_file=None).health_host == "127.0.0.1"  # type: ignore[call-arg]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "HEALTH_HOST=127.0.0.1" in dockerfile and "0.0.0.0" not in dockerfile
    for name in ("docker-compose.yml", "docker-compose.sqlite.yml"):
        data = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
        bot = data["services"]["kotonoha-bot"]
        # The health check runs inside the container: loopback reaches the server there.
        assert bot["environment"]["HEALTH_HOST"] == "127.0.0.1", name
        assert "127.0.0.1" in " ".join(bot["healthcheck"]["test"]), name
        # Only the dashboard is published (on the host's loopback), never the health port.
        ports = [str(p) for p in bot.get("ports", [])]
        assert ports == ["127.0.0.1:${DASHBOARD_PORT:-8765}:${DASHBOARD_PORT:-8765}"], name
