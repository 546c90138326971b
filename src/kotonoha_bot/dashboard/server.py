"""Serving the dashboard with uvicorn inside an asyncio program (the CLI, the bot, tests).

The socket is bound here, so a port in use is a typed :class:`ConfigError` naming it
(uvicorn itself would ``sys.exit``), port 0 picks a free port (tests), and uvicorn
never installs signal handlers: the owner (``kotonoha dashboard`` or ``kotonoha run``)
decides how to stop. Access logs are off (URLs carry guild and session ids, and the
log is not the place for an operator's browsing).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from kotonoha_bot.config import Settings
from kotonoha_bot.dashboard.app import Backend, create_app
from kotonoha_bot.dashboard.auth import check_token
from kotonoha_bot.errors import ConfigError

log = logging.getLogger("kotonoha_bot.dashboard")

DEFAULT_PORT = 8765


class DashboardServer:
    """The dashboard app on ``host:port`` (``port=0``: a free port)."""

    def __init__(self, backend: Backend, *, token: str, host: str, port: int) -> None:
        self.app = create_app(backend, check_token(token))
        self.host = host
        self.requested_port = port
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Where a browser on this host reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"the dashboard cannot listen on {self.host}:{self.requested_port}"
                f" ({exc.strerror or exc}); choose another DASHBOARD_PORT/--port"
            ) from None
        return sock

    async def start(self) -> None:
        """Bind and serve; returns once the port is open."""
        import uvicorn

        if self._server is not None:
            return
        self._socket = self._bind()
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,
        )
        server = uvicorn.Server(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        self._task = asyncio.create_task(server.main_loop(), name="kotonoha:dashboard")
        log.info("dashboard listening on %s", self.url)

    async def stop(self) -> None:
        """Stop serving (open requests are finished first); idempotent."""
        server, self._server = self._server, None
        task, self._task = self._task, None
        if server is None:
            return
        server.should_exit = True
        if task is not None:
            await task
        await server.shutdown(sockets=[self._socket] if self._socket else None)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def dashboard_from_settings(
    backend: Backend,
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
) -> DashboardServer:
    """The server the settings ask for (``--host``/``--port``/a generated token win)."""
    secret = token or (
        settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    )
    chosen = port if port is not None else settings.dashboard_port
    return DashboardServer(
        backend,
        token=check_token(secret),
        host=host or settings.dashboard_host,
        port=DEFAULT_PORT if chosen is None else chosen,
    )
