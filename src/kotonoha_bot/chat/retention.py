"""``DATA_RETENTION_DAYS``: delete the data of guilds the bot has left.

The storage contract has no place to record when the bot left a guild, so the
clock starts when this process *notices* the bot is no longer a member
(``on_guild_remove``, or the first sweep that finds data of a guild it is not in).
A restart restarts the clock: data is never deleted earlier than promised, only
possibly later. ``DATA_RETENTION_DAYS=0`` (the default) keeps everything until an
admin runs ``/kb forget scope:guild`` while the bot is still in the guild.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from kotonoha_bot.db.contract import DatabaseProtocol, ForgetResult
from kotonoha_bot.models import utcnow

log = logging.getLogger("kotonoha_bot.chat")


class GuildRetention:
    """Tracks guilds the bot left and forgets their data after the retention period."""

    def __init__(
        self,
        db: DatabaseProtocol,
        days: int,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self.days = days
        self._clock = clock
        self._left: dict[int, datetime] = {}

    @property
    def enabled(self) -> bool:
        """False when ``DATA_RETENTION_DAYS=0`` (keep everything)."""
        return self.days > 0

    def note_left(self, guild_id: int) -> None:
        """The bot was removed from a guild: start its clock (if not already running)."""
        self._left.setdefault(guild_id, self._clock())

    def note_joined(self, guild_id: int) -> None:
        """The bot is (again) in a guild: its data stays."""
        self._left.pop(guild_id, None)

    def pending(self) -> dict[int, datetime]:
        """Guilds whose clock runs, with when it started."""
        return dict(self._left)

    async def guilds_with_data(self) -> set[int]:
        """Guild ids that own sessions or knowledge."""
        guilds = {s.guild_id for s in await self._db.list_sessions() if s.guild_id is not None}
        guilds |= {s.guild_id for s in await self._db.list_sources()}
        return guilds

    async def sweep(self, member_guild_ids: Collection[int]) -> dict[int, ForgetResult]:
        """Forget guilds gone for ``days``; ``member_guild_ids`` must be the full list."""
        if not self.enabled:
            return {}
        members = set(member_guild_ids)
        for guild_id in members:
            self.note_joined(guild_id)
        with_data = await self.guilds_with_data()
        for guild_id in with_data - members:
            self.note_left(guild_id)
        now = self._clock()
        deleted: dict[int, ForgetResult] = {}
        for guild_id, since in sorted(self._left.items()):
            if guild_id not in with_data:
                self._left.pop(guild_id, None)
                continue
            if now - since < timedelta(days=self.days):
                continue
            result = await self._db.forget(guild_id=guild_id)
            self._left.pop(guild_id, None)
            deleted[guild_id] = result
            log.warning(
                "retention: deleted data of guild %d (left %s; %d sessions, %d messages,"
                " %d chunks, %d sources)",
                guild_id,
                since.isoformat(timespec="seconds"),
                result.sessions,
                result.messages,
                result.chunks,
                result.sources,
            )
        return deleted
