"""When the bot may join a channel's conversation on its own (opted-in channels only).

Per channel it keeps the last :data:`BUFFER_SIZE` messages in memory (they are not
stored unless the bot joins: then the messages since its last interjection become
part of the channel's eavesdrop session). A judgment (one short yes/no LLM call) is
asked at most every :data:`JUDGE_INTERVAL_SECONDS` per channel and only after
``EAVESDROP_COOLDOWN_SECONDS`` since the bot last joined, so a busy channel costs
at most one small LLM call per interval. The clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from kotonoha_bot.chat.conversation import Incoming

BUFFER_SIZE = 12
JUDGE_INTERVAL_SECONDS = 30.0


@dataclass
class _Channel:
    recent: deque[tuple[int, Incoming]] = field(default_factory=lambda: deque(maxlen=BUFFER_SIZE))
    seq: int = 0
    joined_seq: int = 0  # messages up to this one are already in the session
    judged_seq: int = 0
    last_judged: float = float("-inf")
    last_joined: float = float("-inf")


class EavesdropTracker:
    """Recent messages, cooldown and judgment pacing, per channel."""

    def __init__(
        self,
        *,
        cooldown: float,
        judge_interval: float = JUDGE_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cooldown = cooldown
        self.judge_interval = judge_interval
        self._clock = clock
        self._channels: dict[int, _Channel] = {}

    def observe(self, channel_id: int, message: Incoming) -> None:
        """Remember a message said in the channel."""
        ch = self._channels.setdefault(channel_id, _Channel())
        ch.seq += 1
        ch.recent.append((ch.seq, message))

    def should_judge(self, channel_id: int) -> bool:
        """True when a judgment is due; marks it asked (so concurrent messages do not repeat it)."""
        ch = self._channels.get(channel_id)
        if ch is None or ch.seq == ch.judged_seq:
            return False
        now = self._clock()
        if now - ch.last_joined < self.cooldown or now - ch.last_judged < self.judge_interval:
            return False
        ch.last_judged = now
        ch.judged_seq = ch.seq
        return True

    def recent(self, channel_id: int) -> list[Incoming]:
        """The buffered messages, oldest first (the judgment's context)."""
        ch = self._channels.get(channel_id)
        return [m for _, m in ch.recent] if ch else []

    def join(self, channel_id: int) -> list[Incoming]:
        """The bot joins: start the cooldown, return messages not yet in its session."""
        ch = self._channels.setdefault(channel_id, _Channel())
        ch.last_joined = self._clock()
        new = [m for seq, m in ch.recent if seq > ch.joined_seq]
        ch.joined_seq = ch.seq
        return new

    def forget(self, channel_id: int) -> None:
        """Drop a channel's buffer (eavesdrop turned off, channel deleted)."""
        self._channels.pop(channel_id, None)

    def edit(self, channel_id: int, message_id: int, text: str) -> bool:
        """A buffered message was edited on Discord: the next judgment sees the new text."""
        ch = self._channels.get(channel_id)
        if ch is None:
            return False
        for i, (seq, message) in enumerate(ch.recent):
            if message.message_id == message_id:
                ch.recent[i] = (seq, replace(message, text=text))
                return True
        return False

    def discard(self, channel_id: int, message_ids: Collection[int]) -> int:
        """Buffered messages deleted on Discord never reach a judgment or a session."""
        ch = self._channels.get(channel_id)
        if ch is None:
            return 0
        kept = [(seq, m) for seq, m in ch.recent if m.message_id not in message_ids]
        removed = len(ch.recent) - len(kept)
        if removed:
            ch.recent.clear()
            ch.recent.extend(kept)
        return removed
