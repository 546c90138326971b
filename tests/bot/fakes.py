"""Small stand-ins for discord.py objects: only the attributes the bot uses.

Discord cannot be reached from tests, so messages, channels, threads and
interactions are plain classes that record what the bot sent.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord

_ids = itertools.count(10_000)


def new_id() -> int:
    return next(_ids)


@dataclass
class FakeUser:
    id: int
    display_name: str = "user"
    bot: bool = False

    @property
    def name(self) -> str:
        return self.display_name


@dataclass
class FakeGuild:
    id: int


class FakeTyping:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    async def __aenter__(self) -> None:
        self.channel.typing_entered += 1
        self.channel.typing_active = True

    async def __aexit__(self, *exc: object) -> None:
        self.channel.typing_active = False


@dataclass
class FakeChannel:
    id: int = field(default_factory=new_id)
    type: discord.ChannelType = discord.ChannelType.text
    parent_id: int | None = None
    sent: list[str] = field(default_factory=list)
    typing_entered: int = 0
    typing_active: bool = False
    sent_while_typing: list[bool] = field(default_factory=list)

    async def send(self, content: str, **kwargs: Any) -> FakeMessage:
        self.sent.append(content)
        self.sent_while_typing.append(self.typing_active)
        return FakeMessage(content=content, channel=self, author=FakeUser(1, "kotonoha", True))

    def typing(self) -> FakeTyping:
        return FakeTyping(self)


@dataclass
class FakeMessage:
    content: str
    channel: FakeChannel
    author: FakeUser
    guild: FakeGuild | None = None
    mentions: list[FakeUser] = field(default_factory=list)
    id: int = field(default_factory=new_id)
    type: discord.MessageType = discord.MessageType.default
    reference: Any = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    replies: list[str] = field(default_factory=list)
    threads: list[FakeChannel] = field(default_factory=list)

    async def reply(self, content: str, *, mention_author: bool = True) -> FakeMessage:
        assert mention_author is False, "replies must not ping the author"
        self.replies.append(content)
        return await self.channel.send(content)

    async def create_thread(self, *, name: str, auto_archive_duration: int = 1440) -> FakeChannel:
        thread = FakeChannel(type=discord.ChannelType.public_thread, parent_id=self.channel.id)
        thread.name = name  # type: ignore[attr-defined]
        self.threads.append(thread)
        return thread


@dataclass
class FakePermissions:
    manage_guild: bool = False
    manage_channels: bool = False


class FakeResponse:
    def __init__(self, interaction: FakeInteraction) -> None:
        self.interaction = interaction
        self.deferred = False

    async def send_message(self, content: str, *, ephemeral: bool = False) -> None:
        self.interaction.answers.append((content, ephemeral))

    async def defer(self, *, ephemeral: bool = False, thinking: bool = False) -> None:
        self.deferred = True


class FakeFollowup:
    def __init__(self, interaction: FakeInteraction) -> None:
        self.interaction = interaction

    async def send(self, content: str, *, ephemeral: bool = False) -> None:
        assert self.interaction.response.deferred, "followup without defer"
        self.interaction.answers.append((content, ephemeral))


class FakeInteraction:
    def __init__(
        self,
        *,
        user: FakeUser,
        channel: FakeChannel,
        guild_id: int | None,
        permissions: FakePermissions | None = None,
    ) -> None:
        self.user = user
        self.channel = channel
        self.channel_id = channel.id
        self.guild_id = guild_id
        self.permissions = permissions or FakePermissions()
        self.answers: list[tuple[str, bool]] = []
        self.response = FakeResponse(self)
        self.followup = FakeFollowup(self)
