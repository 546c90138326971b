"""The real bot on a simulated Discord (SimCord), with real storage and the real LLM SDKs.

SimCord (PyPI ``simcord``) runs discord.py's own gateway parsing, cache, app-command
tree and HTTP layer against an in-memory Discord: members send, edit and delete
messages and run slash commands as a user could (permission-checked), and every REST
call the bot makes is recorded. The bot is the production :class:`KotonohaBot` with
the production cogs; its LLM is the official SDK talking to the fake API server on
127.0.0.1; its storage is the ``db`` fixture (a SQLite file or a PostgreSQL database).

``make_sim(**settings)`` (a fixture) opens one; a failing test gets SimCord's
transcript of every gateway event and REST call attached (see ``conftest.py``).

What SimCord has no public verb for is done the way Discord would see it done by a
moderator's client: bulk deletes, channel/thread deletes and a member-started thread
are REST calls made with the bot's own discord.py client from the test
(:meth:`Sim.as_moderator`), after which :meth:`Sim.settle` lets the bot handle the
events the simulated Discord sends back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import simcord

from kotonoha_bot.bot.client import KotonohaBot
from kotonoha_bot.bot.handler import MessageHandler
from kotonoha_bot.chat import ChatService
from kotonoha_bot.db import DatabaseProtocol
from kotonoha_bot.knowledge.archive import archive_idle_sessions
from kotonoha_bot.models import utcnow
from tests.chat.support import chat_service, chat_settings
from tests.fakes.api_server import FakeAPIServer

#: How long one simulated step may take before the test fails with SimCord's diagnosis.
#: (A virtual sleep shorter than this is waited out in real time by SimCord's settling,
#: so it stays below the bot's own short waits, e.g. a rate-limited message's 30 s.)
SETTLE_SECONDS = 20.0

ADMIN_PERMISSIONS = discord.Permissions(
    manage_guild=True, manage_channels=True, manage_messages=True
)


@dataclass
class Sim:
    """One simulated Discord with the bot logged in."""

    env: simcord.Env
    bot: KotonohaBot
    chat: ChatService
    api: FakeAPIServer
    db: DatabaseProtocol

    # --- arranging ------------------------------------------------------------------

    def guild(self, name: str = "ことはの森") -> simcord.GuildHandle:
        """A guild the bot is in."""
        return self.env.create_guild(name)

    def member(
        self, guild: simcord.GuildHandle, name: str, *, admin: bool = False
    ) -> simcord.MemberActor:
        """A member (display name ``name``); ``admin`` gives Manage Server/Channels/Messages."""
        user = self.env.create_user(f"user-{len(self.env.backend.users)}", global_name=name)
        roles = [guild.create_role(f"admin-{name}", permissions=ADMIN_PERMISSIONS)] if admin else []
        return guild.add_member(user, roles=roles)

    def room(
        self, name: str = "ミナ"
    ) -> tuple[simcord.GuildHandle, simcord.ChannelHandle, simcord.MemberActor]:
        """Most tests' stage: a guild, its #general and one member called ``name``."""
        guild = self.guild()
        return guild, guild.create_text_channel("general"), self.member(guild, name)

    # --- acting ---------------------------------------------------------------------

    async def mention(
        self, member: simcord.MemberActor, channel: simcord.ChannelHandle, text: str
    ) -> discord.Message:
        """The member mentions the bot with ``text``."""
        assert self.bot.user is not None
        return await member.send(channel, f"{self.bot.user.mention} {text}")

    async def as_moderator(self, action: Callable[[KotonohaBot], Awaitable[Any]]) -> Any:
        """A REST call SimCord has no actor verb for, then the bot handles the events."""
        result = await action(self.bot)
        await self.env.settle()
        return result

    async def settle(self) -> None:
        """Let the bot finish reacting to everything so far."""
        await self.env.settle()

    async def archive(self) -> int:
        """What the archiving job does, now, for every session (idle or not).

        The job's own timer is left alone: SimCord's virtual timers fall back to real
        time, so a job firing by itself in the middle of a slow test (a loaded CI host)
        would race the test's own steps. Returns chunks added.
        """
        s = self.chat.settings
        report = await archive_idle_sessions(
            self.db,
            self.chat.embedder,
            idle_minutes=1e-9,
            window=s.archive_window_messages,
            overlap=s.archive_window_overlap,
        )
        self.chat.sessions.evict_idle(utcnow())
        return report.chunks_added

    # --- looking --------------------------------------------------------------------

    def bot_messages(self, channel: simcord.ChannelHandle) -> list[str]:
        """What the bot posted in a channel, oldest first."""
        me = self.bot.user.id if self.bot.user else None
        kinds = (discord.MessageType.default, discord.MessageType.reply)
        return [m.content for m in channel.history() if m.author.id == me and m.type in kinds]

    async def stored_text(self) -> str:
        """Every stored message and chunk text, to look for what must be gone."""
        parts = []
        for info in await self.db.list_sessions():
            session = await self.db.load_session(info.session_key)
            assert session is not None
            parts += [m.content for m in session.messages]
        for src in await self.db.list_sources():
            assert src.source_id is not None
            parts += [c.content for c in await self.db.list_chunks(src.source_id)]
        return "\n".join(parts)

    def prompt(self) -> str:
        """Everything the LLM was sent in its last request (system and all messages)."""
        return json.dumps(self.api.last("messages").json, ensure_ascii=False)

    def llm_calls(self) -> int:
        """How many chat requests reached the (fake) LLM API."""
        return len(self.api.requests_for("messages"))

    def edits_of_original(self) -> list[str]:
        """The contents an interaction's original response was edited to, in order."""
        return [
            str((r.json or {}).get("content"))
            for r in self.env.http_requests
            if r.method == "PATCH" and r.path.endswith("/messages/@original")
        ]


SimFactory = Callable[..., Any]


def sim_factory(
    db: DatabaseProtocol, api: FakeAPIServer, tmp_path: Path, opened: list[Sim]
) -> SimFactory:
    """``async with make_sim(handler_kwargs=..., **settings) as sim:`` (fixture ``make_sim``)."""

    @asynccontextmanager
    async def make(
        handler_kwargs: dict[str, Any] | None = None, **overrides: Any
    ) -> AsyncIterator[Sim]:
        # A generous LLM timeout: SimCord's virtual timers fall back to real time, and a
        # first request on a busy host (SDK imports) must not time out for real.
        values: dict[str, Any] = {"backup_interval_hours": 0, "llm_timeout": 120.0}
        values.update(overrides)
        settings = chat_settings(tmp_path, **values)
        async with chat_service(db, api, settings) as service:
            handler = None
            if handler_kwargs is not None:
                # The production handler with some parts swapped (a limiter or an
                # eavesdrop tracker with a test clock).
                bots: list[KotonohaBot] = []
                handler = MessageHandler(
                    service,
                    settings,
                    bot_user_id=lambda: bots[0].user.id if bots and bots[0].user else None,
                    **handler_kwargs,
                )
            bot = KotonohaBot(service, settings, handler=handler)
            if handler is not None:
                bots.append(bot)
            # Settling waits for real I/O (storage, the fake LLM API) too: on a loaded
            # CI host that can take seconds, so allow more than SimCord's 5 s.
            async with simcord.run(bot, settle_timeout=SETTLE_SECONDS) as env:
                sim = Sim(env, bot, service, api, db)
                opened.append(sim)
                yield sim

    return make
