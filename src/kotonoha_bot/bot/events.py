"""Edits and deletes on Discord reach the bot's memory (``EventsCog``).

The *raw* events are used, so messages that are not (or no longer) in discord.py's
message cache — older ones, or any after a restart — are followed too:

=================================  ==============================================
Discord event                      what is changed in storage
=================================  ==============================================
``on_raw_message_edit``            the stored text of the message; the bot's reply
                                   to the old text and every chunk built from
                                   either go; neighbours are archived again
``on_raw_message_delete``          the message, the bot's reply of its turn (or,
``on_raw_bulk_message_delete``     for the bot's own message, that reply) and every
                                   chunk built from any of them; neighbours are
                                   archived again
``on_guild_channel_delete``        every session of the channel (its threads
``on_raw_thread_delete``           included) or of the thread, every message posted
                                   there, and the knowledge built from them;
                                   documents scoped to the channel stay
=================================  ==============================================

The eavesdrop buffer (messages seen but not stored) follows as well. A change that
fails (the database is down) is kept and retried by :meth:`EventsCog.retry_failed`
every few minutes, so a delete is not lost to an outage; the queue lives in memory
(a restart during an outage loses it — the message then stays, and is logged).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord.ext import commands

from kotonoha_bot.bot.handler import MessageHandler
from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.errors import KotonohaError

log = logging.getLogger("kotonoha_bot.bot")

#: Failed changes kept for a retry (the oldest are dropped, with a log line, beyond it).
MAX_PENDING = 10_000

Change = Callable[[], Awaitable[object]]


class EventsCog(commands.Cog):
    """Message edits and deletes, channel and thread deletes."""

    def __init__(self, chat: ChatService, handler: MessageHandler) -> None:
        self.chat = chat
        self.handler = handler
        self.pending: deque[tuple[str, Change]] = deque()

    async def _apply(self, what: str, change: Change) -> None:
        try:
            await change()
        except KotonohaError as exc:
            log.error("%s failed, will retry: %s: %s", what, type(exc).__name__, exc)
            if len(self.pending) >= MAX_PENDING:
                dropped, _ = self.pending.popleft()
                log.error("retry queue full: %s is given up", dropped)
            self.pending.append((what, change))

    async def retry_failed(self) -> int:
        """Apply the changes that failed earlier again; returns how many succeeded."""
        done = 0
        for _ in range(len(self.pending)):
            what, change = self.pending.popleft()
            try:
                await change()
            except KotonohaError as exc:
                log.warning("%s failed again: %s", what, exc)
                self.pending.append((what, change))
            else:
                done += 1
        return done

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A message was edited: the stored text follows (embed-only updates change nothing)."""
        if "content" not in payload.data:
            return
        message = payload.message
        if message.author.bot:
            return
        text = self.handler.text_of(message)
        self.handler.eavesdrop.edit(payload.channel_id, payload.message_id, text)
        guild_id = payload.guild_id

        async def change() -> object:
            return await self.chat.message_edited(guild_id, payload.message_id, text)

        await self._apply(f"following the edit of message {payload.message_id}", change)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A message was deleted (cached or not): it leaves the bot's memory."""
        await self._deleted(payload.guild_id, payload.channel_id, [payload.message_id])

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """Several messages were deleted at once (a moderator's purge)."""
        await self._deleted(payload.guild_id, payload.channel_id, sorted(payload.message_ids))

    async def _deleted(self, guild_id: int | None, channel_id: int, ids: list[int]) -> None:
        self.handler.eavesdrop.discard(channel_id, set(ids))

        async def change() -> object:
            return await self.chat.messages_deleted(guild_id, ids)

        await self._apply(f"following the deletion of {len(ids)} message(s)", change)

    @commands.Cog.listener()
    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        """A channel was deleted: its conversations (threads included) leave memory."""
        await self._channel_gone(channel.guild.id, channel.id)

    @commands.Cog.listener()
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        """A thread was deleted (cached or not): its conversation leaves memory."""
        await self._channel_gone(payload.guild_id, payload.thread_id)

    async def _channel_gone(self, guild_id: int, channel_id: int) -> None:
        self.handler.eavesdrop.forget(channel_id)

        async def change() -> Any:
            return await self.chat.channel_deleted(guild_id, channel_id)

        await self._apply(f"following the deletion of channel {channel_id}", change)
