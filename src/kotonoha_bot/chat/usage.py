"""What the LLM costs: usage records from the provider's own numbers, and daily budgets.

Every LLM call's tokens are recorded as the provider reported them (Anthropic
``usage.input_tokens``/``output_tokens``, OpenAI ``usage.prompt_tokens``/
``completion_tokens``, carried by :class:`~kotonoha_bot.llm.base.LLMReply`), per UTC day,
guild (0 = DMs and the terminal's DM mode), user (0 = no one in particular, e.g. the
eavesdrop judgment) and model. No tokenizer guesses: a call the provider reports no
usage for counts as 0 tokens.

**Budgets.** ``GUILD_DAILY_TOKEN_BUDGET`` caps a guild's tokens per UTC day and
``USER_DAILY_TOKEN_BUDGET`` one user's in one guild (or in their DMs). A turn is
refused *before* anything is asked of the LLM (or the embedder) once the recorded
total has reached a budget; the call that crosses it is still answered, so a day
may end a little above the budget (by at most one reply). Failing to record usage
is logged and never fails a turn.

**Kinds.** A call is recorded under its kind: the answer (and the eavesdrop judgment)
under the model's own name, the relevance judge (:mod:`kotonoha_bot.chat.judge`) under
``relevance-judge:<model>``, so ``kotonoha usage`` and the dashboard list its cost on a
line of its own while the budgets count both. The judge asks :meth:`UsageMeter.headroom`
first and is skipped when its call could cross a budget: it never spends the tokens the
answer needs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

from kotonoha_bot.config import Settings
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.llm.base import LLMReply
from kotonoha_bot.models import UsageRecord, utcnow

log = logging.getLogger("kotonoha_bot.chat")

#: Users listed in a usage summary (the heaviest first).
TOP_USERS = 5
#: What a usage row's model starts with for each kind of call other than the answer.
KIND_PREFIXES = {"judge": "relevance-judge:"}

UsageKind = Literal["answer", "judge"]


def usage_model(model: str, kind: UsageKind = "answer") -> str:
    """The model column of a usage row: the model, prefixed by its kind unless an answer."""
    return KIND_PREFIXES.get(kind, "") + model


def scope_key(guild_id: int | None) -> int:
    """The guild column of a usage row: the guild, or 0 for DMs."""
    return 0 if guild_id is None else guild_id


@dataclass(frozen=True, slots=True)
class Totals:
    """Calls and tokens summed over some usage rows."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def plus(self, row: UsageRecord) -> Totals:
        """These totals with one more row added."""
        return Totals(
            self.calls + row.calls,
            self.input_tokens + row.input_tokens,
            self.output_tokens + row.output_tokens,
        )


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """Today and this month (UTC) for one guild, or for every guild when ``guild_id`` is None."""

    today: date
    guild_id: int | None
    day: Totals
    month: Totals
    month_by_model: dict[str, Totals] = field(default_factory=dict)
    month_by_user: list[tuple[int, Totals]] = field(default_factory=list)
    month_by_guild: dict[int, Totals] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (``kotonoha usage --json``)."""

        def t(x: Totals) -> dict[str, int]:
            return {
                "calls": x.calls,
                "input_tokens": x.input_tokens,
                "output_tokens": x.output_tokens,
                "total_tokens": x.tokens,
            }

        return {
            "today": self.today.isoformat(),
            "month": self.today.strftime("%Y-%m"),
            "guild_id": self.guild_id,
            "day_totals": t(self.day),
            "month_totals": t(self.month),
            "month_by_model": {k: t(v) for k, v in sorted(self.month_by_model.items())},
            "month_by_user": [{"user_id": u, **t(v)} for u, v in self.month_by_user],
            "month_by_guild": {str(g): t(v) for g, v in sorted(self.month_by_guild.items())},
        }


class UsageMeter:
    """Records each LLM call's reported usage and answers budget questions."""

    def __init__(
        self, db: DatabaseProtocol, settings: Settings, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock

    def today(self) -> date:
        """The current UTC day (budgets and reports count by it)."""
        return self._clock().date()

    async def _budgets_used(
        self, guild_id: int | None, user_id: int | None
    ) -> list[tuple[str, int, int, int]]:
        """``(who, id, used today, budget)`` for each daily budget that applies (guild first).

        Raises the storage error when usage cannot be read (the callers decide).
        """
        s = self._settings
        day = self.today()
        found: list[tuple[str, int, int, int]] = []
        if guild_id is not None and s.guild_daily_token_budget:
            used = await self._db.tokens_used(day=day, guild_id=guild_id)
            found.append(("guild", guild_id, used, s.guild_daily_token_budget))
        if user_id is not None and s.user_daily_token_budget:
            used = await self._db.tokens_used(
                day=day, guild_id=scope_key(guild_id), user_id=user_id
            )
            found.append(("user", user_id, used, s.user_daily_token_budget))
        return found

    async def refusal(self, guild_id: int | None, user_id: int | None) -> str | None:
        """The budget message when a daily budget is used up, else None (go ahead)."""
        s = self._settings
        if not (s.guild_daily_token_budget or s.user_daily_token_budget):
            return None
        try:
            budgets = await self._budgets_used(guild_id, user_id)
        except KotonohaError as exc:
            # Without the numbers the budget cannot be judged; answering is the kinder error.
            log.warning("could not read usage for the budget check: %s", exc)
            return None
        for who, key, used, budget in budgets:
            if used >= budget:
                log.info("%s %d reached its daily token budget (%d)", who, key, used)
                return s.budget_exceeded_message
        return None

    async def headroom(self, guild_id: int | None, user_id: int | None) -> int | None:
        """Tokens left today before the tightest budget of this guild/user; None = no limit.

        0 when a budget is used up. When usage cannot be read the storage error is
        raised: the caller (the relevance judge, an optional call) skips its call and
        says why, rather than reporting a used-up budget that is not.
        """
        left = [budget - used for _, _, used, budget in await self._budgets_used(guild_id, user_id)]
        return max(min(left), 0) if left else None

    async def record(
        self,
        guild_id: int | None,
        user_id: int | None,
        reply: LLMReply,
        *,
        kind: UsageKind = "answer",
    ) -> None:
        """Add one call's reported tokens to today's row of its kind (never raises)."""
        try:
            await self._db.record_usage(
                UsageRecord(
                    day=self.today(),
                    model=usage_model(reply.model or "unknown", kind),
                    guild_id=scope_key(guild_id),
                    user_id=user_id or 0,
                    calls=1,
                    input_tokens=max(int(reply.input_tokens), 0),
                    output_tokens=max(int(reply.output_tokens), 0),
                )
            )
        except KotonohaError as exc:
            log.warning("could not record LLM usage: %s", exc)

    async def summary(self, guild_id: int | None, *, today: date | None = None) -> UsageSummary:
        """Today's and this month's totals; per model, the heaviest users, per guild."""
        day = today or self.today()
        first = day.replace(day=1)
        rows = await self._db.list_usage(since=first, until=day, guild_id=guild_id)
        day_totals, month = Totals(), Totals()
        by_model: dict[str, Totals] = defaultdict(Totals)
        by_user: dict[int, Totals] = defaultdict(Totals)
        by_guild: dict[int, Totals] = defaultdict(Totals)
        for row in rows:
            month = month.plus(row)
            if row.day == day:
                day_totals = day_totals.plus(row)
            by_model[row.model] = by_model[row.model].plus(row)
            by_guild[row.guild_id] = by_guild[row.guild_id].plus(row)
            if row.user_id:
                by_user[row.user_id] = by_user[row.user_id].plus(row)
        top = sorted(by_user.items(), key=lambda kv: (-kv[1].tokens, kv[0]))[:TOP_USERS]
        return UsageSummary(
            today=day,
            guild_id=guild_id,
            day=day_totals,
            month=month,
            month_by_model=dict(by_model),
            month_by_user=top,
            month_by_guild=dict(by_guild),
        )
