"""The Discord client. It receives its settings and pipeline; it owns no storage.

Resources (database, embedder, LLM, health server) are created by
:func:`kotonoha_bot.bot.runtime.serve` with ``async with`` and passed in, as in
discord.py's ``examples/advanced_startup.py``; ``setup_hook`` adds one cog per
feature, reads the eavesdrop opt-ins, starts the background jobs and syncs the
slash commands.
"""

from __future__ import annotations

import logging
from pathlib import Path

import discord
from discord.ext import commands

from kotonoha_bot.bot.background import Periodic
from kotonoha_bot.bot.cogs import AdminCog, ChatCog, ConversationCog, KnowledgeCog
from kotonoha_bot.bot.events import EventsCog
from kotonoha_bot.bot.handler import MessageHandler
from kotonoha_bot.bot.memory_cog import MemoryCog
from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.config import Settings

log = logging.getLogger("kotonoha_bot.bot")

#: How often pending embeddings (after an embedding outage) are retried.
EMBED_PENDING_SECONDS = 300.0
#: How often data of guilds the bot left is checked against DATA_RETENTION_DAYS.
RETENTION_SECONDS = 3600.0
#: Delay before the first automatic backup after a start.
FIRST_BACKUP_DELAY_SECONDS = 600.0
#: Archiving checks at least this often (and at least twice per ARCHIVE_IDLE_MINUTES).
ARCHIVE_MAX_SECONDS = 600.0
#: How often edits/deletes that failed to reach storage (an outage) are retried.
RETRY_CHANGES_SECONDS = 120.0


def intents_for(settings: Settings) -> discord.Intents:
    """Default intents, plus Message Content when ``DISCORD_MESSAGE_CONTENT`` asks for it."""
    intents = discord.Intents.default()
    intents.message_content = settings.discord_message_content
    return intents


class KotonohaBot(commands.Bot):
    """kotonoha on Discord: mentions, threads, DMs, eavesdrop and slash commands."""

    def __init__(
        self,
        chat: ChatService,
        settings: Settings,
        *,
        handler: MessageHandler | None = None,
        sync_commands: bool = True,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,  # unused: no prefix commands
            intents=intents_for(settings),
            help_command=None,
            # The LLM writes the replies: never let them ping @everyone, roles or users.
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.chat = chat
        self.settings = settings
        self.handler = handler or MessageHandler(
            chat, settings, bot_user_id=lambda: self.user.id if self.user else None
        )
        self.sync_commands = sync_commands
        self.events = EventsCog(chat, self.handler)
        self.jobs = self._jobs()

    def _jobs(self) -> list[Periodic]:
        s = self.settings
        jobs = [
            Periodic(
                "archive idle sessions",
                max(5.0, min(ARCHIVE_MAX_SECONDS, s.archive_idle_minutes * 30.0)),
                self.chat.archive_idle,
            ),
            Periodic("embed pending chunks", EMBED_PENDING_SECONDS, self.chat.embed_pending),
            Periodic("retry edits and deletes", RETRY_CHANGES_SECONDS, self.events.retry_failed),
        ]
        if s.session_sync_interval > 0:
            jobs.append(Periodic("save sessions", s.session_sync_interval, self.chat.flush))
        if s.backup_interval_hours > 0:
            interval = s.backup_interval_hours * 3600.0
            # The first backup comes a little after startup, not a full interval later:
            # a bot restarted daily would otherwise never back up.
            jobs.append(
                Periodic(
                    "database backup",
                    interval,
                    self.backup,
                    first_delay=min(interval, FIRST_BACKUP_DELAY_SECONDS),
                )
            )
        if self.chat.retention.enabled:
            jobs.append(Periodic("data retention", RETENTION_SECONDS, self._retention))
        return jobs

    async def backup(self) -> Path:
        """Back up the configured database and rotate (the ``BACKUP_INTERVAL_HOURS`` job).

        The bot layer schedules it; the tool it runs is ``transfer/``, which nothing
        below the bot imports.
        """
        from kotonoha_bot.transfer.backup import run_backup

        path = await run_backup(self.settings)
        log.info("database backup written: %s", path)
        return path

    async def _retention(self) -> None:
        # Only a connected client knows every guild it is in; never judge from a partial list.
        if not self.is_ready() or self.is_closed():
            return
        await self.chat.sweep_retention({g.id for g in self.guilds})

    async def add_features(self) -> None:
        """Add one cog per feature (no network needed)."""
        await self.add_cog(ConversationCog(self.handler, self.chat))
        await self.add_cog(ChatCog(self.chat))
        await self.add_cog(KnowledgeCog(self.chat))
        await self.add_cog(MemoryCog(self.chat))
        await self.add_cog(self.events)
        await self.add_cog(AdminCog(self.chat, self.settings, self.handler))

    async def setup_hook(self) -> None:
        """Cogs, eavesdrop opt-ins, background jobs, slash-command sync."""
        await self.add_features()
        channels = await self.chat.load_eavesdrop_channels()
        if channels and not self.settings.discord_message_content:
            log.warning(
                "eavesdrop is on in %d channel(s) but DISCORD_MESSAGE_CONTENT=false:"
                " the bot cannot read those conversations",
                len(channels),
            )
        for job in self.jobs:
            job.start()
        if self.sync_commands and self.application_id is not None:
            try:
                synced = await self.tree.sync()
            except discord.HTTPException as exc:
                log.warning("could not sync slash commands: HTTP %s %s", exc.status, exc.text)
            else:
                log.info("slash commands synced: %s", ", ".join(c.name for c in synced))

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: messages are handled by ConversationCog's listener."""
        return

    async def on_ready(self) -> None:
        """Log who we are and where."""
        user = self.user
        log.info(
            "connected to Discord as %s (%s) in %d guild(s); message content intent: %s",
            user,
            user.id if user else "?",
            len(self.guilds),
            "on" if self.intents.message_content else "off",
        )

    async def close(self) -> None:
        """Stop the jobs, store every unsaved message, then disconnect."""
        for job in self.jobs:
            await job.stop()
        try:
            await self.chat.close()
        finally:
            await super().close()
