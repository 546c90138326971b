"""``kotonoha run``: check the settings, create the resources, run the bot, shut down cleanly.

Order: database (``async with``) -> embedding provider -> LLM provider -> pipeline
-> health server (when ``HEALTH_PORT`` > 0) -> dashboard (when ``DASHBOARD_PORT`` is
set; it refuses to start without ``DASHBOARD_TOKEN``) -> Discord. SIGTERM (``docker stop``)
and SIGINT close the client; on the way out every unsaved message is stored, then
the health server, the LLM and embedding clients and the database are closed, in
reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import discord

from kotonoha_bot.bot.client import KotonohaBot
from kotonoha_bot.chat.service import ChatService, checked_embedder
from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from kotonoha_bot.errors import ConfigError, KotonohaError
from kotonoha_bot.health import health_server_from_settings
from kotonoha_bot.knowledge.embeddings import open_embedder
from kotonoha_bot.llm import create_llm_provider, missing_llm_settings
from kotonoha_bot.transfer.marker import migration_marker

if TYPE_CHECKING:
    from kotonoha_bot.dashboard import DashboardServer

log = logging.getLogger("kotonoha_bot.bot")

#: How the bot connects; tests pass their own instead of reaching Discord.
Connect = Callable[[KotonohaBot, str], Awaitable[None]]


def missing_run_settings(settings: Settings) -> list[str]:
    """Every setting ``kotonoha run`` needs but lacks (all of them, not the first)."""
    missing = []
    if not (settings.discord_token and settings.discord_token.get_secret_value().strip()):
        missing.append("DISCORD_TOKEN")
    missing.extend(missing_llm_settings(settings))
    return missing


async def _discord_start(bot: KotonohaBot, token: str) -> None:
    await bot.start(token)


async def serve(settings: Settings, *, connect: Connect = _discord_start) -> None:
    """Run the bot until it is closed; resources are released on every way out."""
    token = settings.discord_token.get_secret_value() if settings.discord_token else ""
    marker = await migration_marker(settings.database_location(), settings)
    if marker is not None:
        # A half-migrated target would serve partial data and then diverge from the
        # source; the operator must finish (rerun) or discard the migration first.
        raise ConfigError(
            "this database is the target of an unfinished `kotonoha db migrate`; rerun the"
            " same migrate command to finish it (or `--restart`), then start the bot"
        )
    async with open_database(settings) as db:
        embedder = await open_embedder(db, settings)
        try:
            llm = create_llm_provider(settings)
        except BaseException:
            await embedder.aclose()
            raise
        chat = ChatService(db, llm, await checked_embedder(db, embedder), settings)
        bot = KotonohaBot(chat, settings)
        health = health_server_from_settings(
            db,
            settings,
            discord_ready=lambda: bot.is_ready() and not bot.is_closed(),
            llm_state=chat.llm_health.as_dict,
        )
        try:
            dashboard = _dashboard(db, settings, chat, bot)
        except BaseException:
            await llm.aclose()
            await embedder.aclose()
            raise
        try:
            if health is not None:
                await health.start()
            if dashboard is not None:
                await dashboard.start()
            with _close_on_signals(bot):
                async with bot:
                    await connect(bot, token)
        except discord.PrivilegedIntentsRequired:
            raise ConfigError(
                "Discord refused the Message Content intent: enable it for the bot in the"
                " Developer Portal (Bot -> Privileged Gateway Intents), or set"
                " DISCORD_MESSAGE_CONTENT=false (mentions, DMs and slash commands keep working)"
            ) from None
        except discord.LoginFailure:
            raise ConfigError("Discord rejected DISCORD_TOKEN (check the bot token)") from None
        except (OSError, discord.GatewayNotFound, discord.HTTPException) as exc:
            raise KotonohaError(f"cannot connect to Discord: {type(exc).__name__}: {exc}") from None
        finally:
            try:
                await chat.close()
            finally:
                if dashboard is not None:
                    await dashboard.stop()
                if health is not None:
                    await health.stop()
                await llm.aclose()
                await embedder.aclose()
        log.info("stopped; all sessions saved")


def _dashboard(
    db: DatabaseProtocol, settings: Settings, chat: ChatService, bot: KotonohaBot
) -> DashboardServer | None:
    """The dashboard inside the bot when ``DASHBOARD_PORT`` is set (None: off)."""
    if settings.dashboard_port is None:
        return None
    try:
        from kotonoha_bot.dashboard import dashboard_from_settings
        from kotonoha_bot.dashboard.app import Backend
        from kotonoha_bot.dashboard.status import BotLink
    except ImportError as exc:
        raise ConfigError(
            f"DASHBOARD_PORT is set but the [dashboard] extra is not installed ({exc.name}"
            " is missing): pip install 'kotonoha-bot[dashboard]', or unset DASHBOARD_PORT"
        ) from None

    def guild_name(guild_id: int) -> str | None:
        guild = bot.get_guild(guild_id)
        return guild.name if guild is not None else None

    backend = Backend(
        db,
        settings,
        settings.database_location(),
        embedder=lambda: chat.embedder,
        chat=chat,
        bot=BotLink(
            discord_ready=lambda: bot.is_ready() and not bot.is_closed(),
            llm_health=chat.llm_health,
            guild_name=guild_name,
        ),
    )
    return dashboard_from_settings(backend, settings)


@contextlib.contextmanager
def _close_on_signals(bot: KotonohaBot) -> Iterator[None]:
    """SIGTERM/SIGINT close the client, so ``bot.start`` returns and cleanup runs."""
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()  # references keep the tasks alive

    installed: list[signal.Signals] = []

    def request_close(sig: signal.Signals) -> None:
        log.info("%s received: saving sessions and shutting down", sig.name)
        # A second Ctrl-C should interrupt a shutdown that hangs: restore the defaults.
        for s in installed:
            loop.remove_signal_handler(s)
        installed.clear()
        task = loop.create_task(bot.close())
        closing.add(task)
        task.add_done_callback(closing.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, request_close, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / Windows
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
