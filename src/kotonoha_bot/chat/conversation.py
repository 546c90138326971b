"""Where a turn happens: the session key and the scope a conversation belongs to.

Session keys (one stored ``ChatSession`` each):

============================== ========== ======================================
key                            type       conversation
============================== ========== ======================================
``mention:{channel}:{user}``   mention    one user talking to the bot by mention
                                          in one channel (``kotonoha chat`` too)
``thread:{thread}``            thread     everyone in a thread the bot answers in
``dm:{channel}``               dm         a direct message channel (no guild)
``eavesdrop:{channel}``        eavesdrop  the bot joining a channel's talk; the
                                          session's status is the opt-in flag
============================== ========== ======================================

Discord ids are globally unique snowflakes, so channel and thread ids alone make
keys unique across guilds. A thread's ``channel_id`` is its parent channel, so
channel-scoped knowledge and ``forget`` cover the channel's threads too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kotonoha_bot.models import SessionType


@dataclass(frozen=True, slots=True)
class Conversation:
    """The session a turn belongs to and its guild/channel scope (guild None = DM)."""

    session_key: str
    session_type: SessionType
    guild_id: int | None
    channel_id: int | None
    thread_id: int | None = None
    user_id: int | None = None

    @property
    def is_dm(self) -> bool:
        """A direct message: no guild, so no guild's knowledge is ever retrieved."""
        return self.guild_id is None

    @property
    def reply_channel_id(self) -> int | None:
        """The Discord channel the conversation happens in (the thread for a thread)."""
        return self.thread_id if self.thread_id is not None else self.channel_id

    @property
    def multi_party(self) -> bool:
        """Several people may speak: user turns are labelled with their names."""
        return self.session_type in ("thread", "eavesdrop")

    @classmethod
    def mention(cls, guild_id: int, channel_id: int, user_id: int) -> Conversation:
        """A user's mention conversation in one channel."""
        return cls(
            f"mention:{channel_id}:{user_id}", "mention", guild_id, channel_id, None, user_id
        )

    @classmethod
    def thread(cls, guild_id: int, parent_channel_id: int | None, thread_id: int) -> Conversation:
        """A thread's conversation (everyone in it)."""
        return cls(f"thread:{thread_id}", "thread", guild_id, parent_channel_id, thread_id)

    @classmethod
    def dm(cls, channel_id: int, user_id: int | None) -> Conversation:
        """A direct-message conversation."""
        return cls(f"dm:{channel_id}", "dm", None, channel_id, None, user_id)

    @classmethod
    def eavesdrop(cls, guild_id: int, channel_id: int) -> Conversation:
        """The channel conversation the bot joins uninvited (when opted in)."""
        return cls(f"eavesdrop:{channel_id}", "eavesdrop", guild_id, channel_id)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message someone sent, as the pipeline sees it (text already NUL-free or not)."""

    text: str
    author_id: int | None = None
    author_name: str | None = None
    message_id: int | None = None
    timestamp: datetime | None = None
    #: The channel or thread it was posted in (default: the conversation's).
    channel_id: int | None = None
