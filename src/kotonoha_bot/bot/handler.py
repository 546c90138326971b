"""Turning Discord messages into pipeline turns: triggers, rate limits, replies.

Triggers, in order (the bot ignores bots, itself included, and system messages):

1. a DM -> ``dm:{channel}``;
2. a thread the bot already talks in, or a mention inside any thread ->
   ``thread:{thread}`` (later messages in it continue without a mention);
3. a mention (or a reply to one of the bot's messages) in a channel ->
   ``mention:{channel}:{user}``, or a new thread from the message when
   ``DISCORD_MENTION_THREAD`` is on;
4. otherwise, in a channel with eavesdrop on: the message is remembered, and now
   and then an LLM judgment decides whether the bot joins (``eavesdrop:{channel}``).

While the operator's pause switch is on (the dashboard; stored in the database, so a
separate ``kotonoha dashboard`` process sets it) no trigger is answered: no reply, no
LLM call, nothing stored. Edits and deletes still follow Discord.

The handler only uses a few attributes of discord.py objects; tests drive it through
SimCord (discord.py's real gateway and HTTP layer on an in-memory Discord) and, for a
few edge cases SimCord cannot stage, with small fakes. The Discord ids of the parts
a reply was sent as are handed to the pipeline, so deleting them removes the reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import discord

from kotonoha_bot.bot import texts
from kotonoha_bot.bot.eavesdrop import EavesdropTracker
from kotonoha_bot.bot.ratelimit import RateLimiter
from kotonoha_bot.bot.split import split_message
from kotonoha_bot.chat.conversation import Conversation, Incoming
from kotonoha_bot.chat.service import ChatService
from kotonoha_bot.config import Settings
from kotonoha_bot.errors import KotonohaError

log = logging.getLogger("kotonoha_bot.bot")

THREAD_TYPES = frozenset(
    {
        discord.ChannelType.public_thread,
        discord.ChannelType.private_thread,
        discord.ChannelType.news_thread,
    }
)
HANDLED_MESSAGE_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
THREAD_NAME_CHARS = 40
THREAD_AUTO_ARCHIVE_MINUTES: Literal[60, 1440, 4320, 10080] = 1440

Sleep = Callable[[float], Awaitable[Any]]


def clean_content(content: str, bot_id: int | None, mentions: list[Any]) -> str:
    """The message text without the bot's mention; other user mentions become @names."""
    text = content
    if bot_id is not None:
        text = re.sub(rf"<@!?{bot_id}>", "", text)
    for user in mentions:
        if user.id != bot_id:
            name = f"@{user.display_name}"
            text = text.replace(f"<@{user.id}>", name).replace(f"<@!{user.id}>", name)
    return text.strip()


def thread_name(text: str) -> str:
    """A short thread title from the first line of the message."""
    first = text.strip().split("\n", 1)[0].strip()
    if not first:
        return texts.THREAD_NAME_FALLBACK
    return first if len(first) <= THREAD_NAME_CHARS else first[: THREAD_NAME_CHARS - 1] + "…"


class MessageHandler:
    """Routes one message to the pipeline and sends the answer back."""

    def __init__(
        self,
        chat: ChatService,
        settings: Settings,
        *,
        bot_user_id: Callable[[], int | None],
        limiter: RateLimiter | None = None,
        eavesdrop: EavesdropTracker | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.chat = chat
        self.settings = settings
        self._bot_user_id = bot_user_id
        self.limiter = limiter or RateLimiter(
            user_per_minute=settings.rate_limit_user_per_minute,
            guild_per_minute=settings.rate_limit_guild_per_minute,
        )
        self.eavesdrop = eavesdrop or EavesdropTracker(cooldown=settings.eavesdrop_cooldown_seconds)
        self._sleep = sleep

    async def handle(self, message: discord.Message) -> None:
        """Entry point for ``on_message``."""
        if message.author.bot or message.type not in HANDLED_MESSAGE_TYPES:
            return
        me = self._bot_user_id()
        channel: Any = message.channel
        text = self.text_of(message)
        if message.guild is None:
            conv = Conversation.dm(channel.id, message.author.id)
            await self._converse(message, conv, channel, text, mentioned=True)
            return
        guild_id = message.guild.id
        mentioned = self._mentions_me(message, me)
        if channel.type in THREAD_TYPES:
            conv = Conversation.thread(guild_id, channel.parent_id, channel.id)
            if mentioned or (text and await self.chat.is_active(conv.session_key)):
                await self._converse(message, conv, channel, text, mentioned=mentioned)
                return
        elif mentioned:
            if self.settings.discord_mention_thread and channel.type == discord.ChannelType.text:
                thread = await self._open_thread(message, text)
                if thread is not None:
                    conv = Conversation.thread(guild_id, channel.id, thread.id)
                    await self._converse(message, conv, thread, text, mentioned=True)
                    return
            conv = Conversation.mention(guild_id, channel.id, message.author.id)
            await self._converse(message, conv, channel, text, mentioned=True)
            return
        if text and self.chat.eavesdrop_enabled(channel.id):
            await self._overhear(message, guild_id, channel, text)

    # --- helpers ------------------------------------------------------------------------

    @staticmethod
    def _mentions_me(message: discord.Message, me: int | None) -> bool:
        if me is None:
            return False
        if any(user.id == me for user in message.mentions):
            return True
        ref = message.reference
        resolved = getattr(ref, "resolved", None) if ref is not None else None
        author = getattr(resolved, "author", None)
        return author is not None and author.id == me

    def text_of(self, message: discord.Message) -> str:
        """What is stored of a message: its text without the bot's mention (also for edits)."""
        return clean_content(message.content, self._bot_user_id(), list(message.mentions))

    @staticmethod
    def _incoming(message: discord.Message, text: str) -> Incoming:
        return Incoming(
            text=text,
            author_id=message.author.id,
            author_name=message.author.display_name,
            message_id=message.id,
            timestamp=message.created_at,
            channel_id=message.channel.id,
        )

    async def _open_thread(self, message: discord.Message, text: str) -> Any:
        try:
            return await message.create_thread(
                name=thread_name(text), auto_archive_duration=THREAD_AUTO_ARCHIVE_MINUTES
            )
        except discord.HTTPException as exc:
            log.warning("could not open a thread (%s); answering in the channel", exc.status)
            return None

    async def _converse(
        self,
        message: discord.Message,
        conv: Conversation,
        target: Any,
        text: str,
        *,
        mentioned: bool,
    ) -> None:
        if await self.chat.paused():
            # The operator's pause (dashboard): no reply, no LLM call, nothing stored;
            # edits, deletes and /kb forget still follow Discord (they are not answers).
            log.debug("paused: not answering in %s", conv.session_key)
            return
        if not text:
            # A bare mention says hello; an empty thread message (no content intent,
            # an image only) is not a turn.
            if mentioned:
                await self._send(message, target, texts.GREETING)
            return
        decision = self.limiter.acquire(message.author.id, conv.guild_id)
        if not decision.allowed:
            log.info(
                "rate limited (%s) user %d; retry in %.0fs",
                decision.scope,
                message.author.id,
                decision.retry_after,
            )
            if decision.notify:
                template = (
                    texts.RATE_LIMITED_GUILD
                    if decision.scope == "guild"
                    else texts.RATE_LIMITED_USER
                )
                seconds = max(1, round(decision.retry_after))
                await self._send(message, target, template.format(seconds=seconds))
            return
        if decision.wait > 0:
            await self._sleep(decision.wait)
        try:
            async with target.typing():
                reply = await self.chat.respond(conv, [self._incoming(message, text)])
        except KotonohaError as exc:
            log.error("turn in %s failed: %s: %s", conv.session_key, type(exc).__name__, exc)
            await self._send(message, target, self.settings.llm_error_message)
            return
        sent = await self._send(message, target, reply.text)
        await self.chat.record_reply(reply, target.id, sent)

    async def _overhear(
        self, message: discord.Message, guild_id: int, channel: Any, text: str
    ) -> None:
        self.eavesdrop.observe(channel.id, self._incoming(message, text))
        if not self.eavesdrop.should_judge(channel.id) or await self.chat.paused():
            return
        if not await self.chat.should_interject(self.eavesdrop.recent(channel.id), guild_id):
            return
        new = self.eavesdrop.join(channel.id)
        if not new:
            return
        conv = Conversation.eavesdrop(guild_id, channel.id)
        try:
            async with channel.typing():
                reply = await self.chat.respond(conv, new)
        except KotonohaError as exc:
            log.error("eavesdrop turn in %s failed: %s", conv.session_key, exc)
            return
        if reply.ok:  # uninvited: stay quiet rather than apologise
            sent = await self._send(None, channel, reply.text)
            await self.chat.record_reply(reply, channel.id, sent)

    async def _send(self, message: discord.Message | None, target: Any, text: str) -> list[int]:
        """Send ``text`` in parts; the first part replies to ``message`` when in its channel.

        Returns the Discord ids of the parts sent (the reply's provenance).
        """
        sent: list[int] = []
        for i, part in enumerate(split_message(text)):
            try:
                if i == 0 and message is not None and target is message.channel:
                    posted = await message.reply(part, mention_author=False)
                else:
                    posted = await target.send(part)
            except discord.HTTPException as exc:
                log.warning(
                    "could not send to channel %s: HTTP %s %s",
                    getattr(target, "id", "?"),
                    exc.status,
                    exc.text,
                )
                return sent
            posted_id = getattr(posted, "id", None)
            if isinstance(posted_id, int):
                sent.append(posted_id)
        return sent
