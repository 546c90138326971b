"""`kotonoha dashboard`: the operator's web pages as their own process.

The same app runs inside `kotonoha run` when DASHBOARD_PORT is set; run it separately
to look after a database while the bot is stopped, or to keep the bot's process
small. The pause switch works across the two: it is stored in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Annotated

import typer

from kotonoha_bot.cli.common import (
    DatabaseOption,
    database_url,
    err_console,
    fail,
    get_settings,
    run_async,
)
from kotonoha_bot.db import open_database
from kotonoha_bot.redact import register_secret


@run_async
async def dashboard(
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address to listen on; default DASHBOARD_HOST (127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Port; default DASHBOARD_PORT, else 8765."),
    ] = None,
    generate_token: Annotated[
        bool,
        typer.Option(
            "--generate-token",
            help="Without DASHBOARD_TOKEN: make a random token for this run and print it once.",
        ),
    ] = False,
    database: DatabaseOption = None,
) -> None:
    """Serve the dashboard (status, pause switch, memory, search playground, usage).

    It refuses to start without DASHBOARD_TOKEN (16+ characters), or with
    --generate-token a random one printed once on stderr (never logged). Log in at
    /login with it; scripts send `Authorization: Bearer <token>`. Binds 127.0.0.1
    unless --host/DASHBOARD_HOST says otherwise. See docs/OPERATIONS.md.

    Example: DASHBOARD_TOKEN=$(openssl rand -hex 16) kotonoha dashboard --port 8765
    """
    settings = get_settings()
    try:
        from kotonoha_bot.dashboard import dashboard_from_settings
        from kotonoha_bot.dashboard.app import Backend
        from kotonoha_bot.dashboard.auth import check_token
        from kotonoha_bot.dashboard.auth import generate_token as new_token
    except ImportError as exc:
        raise fail(
            f"the dashboard needs the [dashboard] extra ({exc.name} is missing):"
            " pip install 'kotonoha-bot[dashboard]'",
            2,
        ) from None
    from kotonoha_bot.chat.service import checked_embedder
    from kotonoha_bot.knowledge.embeddings import open_embedder

    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    if not token and generate_token:
        token = new_token()
        register_secret(token)
        # Printed once, on the terminal only: the log never carries it.
        err_console.print(f"dashboard token for this run (shown once): {token}", soft_wrap=True)
    # Refused before anything is opened: no database file, no model loaded.
    token = check_token(token)
    url = database_url(settings, database)
    async with open_database(url, settings=settings) as db:
        embedder = await open_embedder(db, settings)
        try:
            checked = await checked_embedder(db, embedder)
            backend = Backend(db, settings, url, embedder=lambda: checked)
            server = dashboard_from_settings(backend, settings, host=host, port=port, token=token)
            await server.start()
            err_console.print(f"dashboard: {server.url}/login (Ctrl-C stops it)")
            try:
                await _until_signal()
            finally:
                await server.stop()
        finally:
            await embedder.aclose()


async def _until_signal() -> None:
    """Wait for SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
