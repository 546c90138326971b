"""The health server: ``GET /health`` (alive) and ``GET /ready`` (able to serve).

``/health`` answers 200 as long as the event loop runs; it touches nothing else, so
an orchestrator restarting on it never restarts the bot for a database outage.
``/ready`` checks, on every request and with a short timeout, that the database
answers and its schema is the one this code expects, and that Discord is
connected (when the bot runs with Discord); 200 when all hold, else 503. The body
is JSON and also reports the embedding backlog (chunks awaiting a vector).

Nothing is cached except the backlog number (refreshed at most every
``backlog_interval`` seconds, dropped on any error), so ``/ready`` turns 200 again
by itself as soon as the database is back. Error details go to the log (redacted,
once per state change), not to the unauthenticated HTTP answer.

Who may see what: the server binds ``127.0.0.1`` by default (the container's own
health check runs inside the container, where loopback reaches it). ``/health`` is
``{"status": "ok"}`` for everyone. ``/ready`` answers every caller with its status
code and ``{"status": ...}``; the details (backend, schema version, backlog, Discord)
only go to a loopback peer or to a caller presenting ``HEALTH_TOKEN`` as
``Authorization: Bearer <token>`` — a monitor elsewhere on the network learns
whether the bot is ready, not what it runs on.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kotonoha_bot.redact import redact

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.db.contract import DatabaseProtocol

log = logging.getLogger(__name__)

DEFAULT_DB_TIMEOUT = 2.5  # seconds; docker's health check gives the whole request 5
DEFAULT_BACKLOG_INTERVAL = 30.0  # seconds between stats() calls for the backlog


@dataclass
class _Backlog:
    value: int | None = None
    at: float = 0.0


class HealthServer:
    """An aiohttp server for ``/health`` and ``/ready``; ``port=0`` picks a free port."""

    def __init__(
        self,
        db: DatabaseProtocol,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        discord_ready: Callable[[], bool] | None = None,
        expected_schema_version: int | None = None,
        db_timeout: float = DEFAULT_DB_TIMEOUT,
        backlog_interval: float = DEFAULT_BACKLOG_INTERVAL,
        token: str | None = None,
        llm_state: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.db = db
        self.llm_state = llm_state
        self.token = token or None
        self.host = host
        self.requested_port = port
        self.discord_ready = discord_ready
        self.expected_schema_version = (
            expected_schema_version
            if expected_schema_version is not None
            else latest_schema_version(db)
        )
        self.db_timeout = db_timeout
        self.backlog_interval = backlog_interval
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._backlog = _Backlog()
        self._inflight: asyncio.Task[tuple[bool, dict[str, Any]]] | None = None
        self._last_problems: tuple[str, ...] | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._port is None:
            raise RuntimeError("the health server is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        """The aiohttp application (routes only; start() serves it)."""
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        return app

    async def start(self) -> None:
        """Bind and serve; returns once the port is open."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self._port = int(addresses[0][1]) if addresses else self.requested_port
        log.info("health server listening on %s:%d (/health, /ready)", self.host, self._port)

    async def stop(self) -> None:
        """Stop serving; idempotent."""
        runner, self._runner = self._runner, None
        self._port = None
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- handlers --------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        ready, body = await self.check()
        if not may_see_details(request.remote, request.headers.get("Authorization"), self.token):
            body = {"status": body["status"]}
        return web.json_response(body, status=200 if ready else 503)

    # --- the readiness check ------------------------------------------------------------

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Run the readiness checks; concurrent callers share one run."""
        task = self._inflight
        if task is None or task.done():
            task = asyncio.ensure_future(self._check())
            self._inflight = task
        return await asyncio.shield(task)

    async def _check(self) -> tuple[bool, dict[str, Any]]:
        problems: list[str] = []
        database: dict[str, Any] = {
            "backend": getattr(self.db, "backend_name", None),
            "reachable": False,
            "schema_version": None,
            "schema_expected": self.expected_schema_version,
            "schema_current": None,
        }
        try:
            version = await asyncio.wait_for(self.db.schema_version(), self.db_timeout)
        except TimeoutError:
            database["error"] = "timeout"
            problems.append(f"database did not answer within {self.db_timeout:g}s")
            self._backlog = _Backlog()
        except Exception as exc:
            database["error"] = type(exc).__name__
            problems.append(f"database unreachable: {type(exc).__name__}: {exc}")
            self._backlog = _Backlog()
        else:
            database["reachable"] = True
            database["schema_version"] = version
            if self.expected_schema_version is not None:
                current = version == self.expected_schema_version
                database["schema_current"] = current
                if not current:
                    problems.append(
                        f"schema version {version}, expected {self.expected_schema_version}"
                    )
            await self._refresh_backlog()

        discord: bool | None = None
        if self.discord_ready is not None:
            try:
                discord = bool(self.discord_ready())
            except Exception as exc:
                discord = False
                problems.append(f"discord check failed: {type(exc).__name__}: {exc}")
            if not discord and not any(p.startswith("discord") for p in problems):
                problems.append("discord not connected")

        ready = not problems
        self._log_transition(problems)
        body = {
            "status": "ready" if ready else "not ready",
            "database": database,
            "embedding_backlog": self._backlog.value,
            "discord_connected": discord,
        }
        if self.llm_state is not None:
            # Informational (the dashboard shows it); a failing model never gates readiness.
            body["llm"] = self.llm_state()
        return ready, body

    async def _refresh_backlog(self) -> None:
        now = time.monotonic()
        if self._backlog.value is not None and now - self._backlog.at < self.backlog_interval:
            return
        try:
            stats = await asyncio.wait_for(self.db.stats(), self.db_timeout)
        except Exception as exc:  # informational only: never gates readiness
            log.debug("embedding backlog unavailable: %s", type(exc).__name__)
            self._backlog = _Backlog()
            return
        self._backlog = _Backlog(stats.pending_chunks, now)

    def _log_transition(self, problems: list[str]) -> None:
        key = tuple(sorted(problems))
        if key == self._last_problems:
            return
        first = self._last_problems is None
        self._last_problems = key
        if problems:
            log.warning("not ready: %s", redact("; ".join(problems)))
        elif not first:
            log.info("ready again")


def may_see_details(remote: str | None, authorization: str | None, token: str | None) -> bool:
    """Loopback peers, and callers with ``Authorization: Bearer <HEALTH_TOKEN>``.

    Only the socket's peer address counts (a forwarded-for header is the caller's claim).
    """
    if token and authorization:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            return True
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def latest_schema_version(db: DatabaseProtocol) -> int | None:
    """The schema version the backend's code expects, when it declares one.

    A backend may expose ``latest_schema_version`` or its module a
    ``LATEST_SCHEMA_VERSION``; otherwise the schema check is skipped (reported null).
    """
    value = getattr(db, "latest_schema_version", None)
    if value is None:
        module = sys.modules.get(type(db).__module__)
        value = getattr(module, "LATEST_SCHEMA_VERSION", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def health_server_from_settings(
    db: DatabaseProtocol,
    settings: Settings,
    *,
    discord_ready: Callable[[], bool] | None = None,
    llm_state: Callable[[], dict[str, Any]] | None = None,
) -> HealthServer | None:
    """The server ``HEALTH_HOST``/``HEALTH_PORT`` ask for; None when ``HEALTH_PORT=0`` (off)."""
    if settings.health_port == 0:
        return None
    token = settings.health_token.get_secret_value() if settings.health_token else None
    return HealthServer(
        db,
        host=settings.health_host,
        port=settings.health_port,
        discord_ready=discord_ready,
        token=token,
        llm_state=llm_state,
    )
