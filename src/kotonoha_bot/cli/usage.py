"""`kotonoha usage`: what the LLM cost today and this month (UTC), per guild and model.

The numbers are the providers' own usage reports, recorded per call by the bot and
``kotonoha chat`` (see :mod:`kotonoha_bot.chat.usage`).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer
from rich.table import Table

from kotonoha_bot.chat.usage import Totals, UsageMeter
from kotonoha_bot.cli.common import (
    DatabaseOption,
    JsonOption,
    database_url,
    err_console,
    fail,
    get_settings,
    out_console,
    print_json,
    run_async,
)
from kotonoha_bot.db import open_database
from kotonoha_bot.models import utcnow


@run_async
async def usage(
    guild: Annotated[
        int | None, typer.Option("--guild", "-g", help="Only this guild (0 = DMs).")
    ] = None,
    day: Annotated[
        str | None, typer.Option("--day", help="Report as of this UTC day (YYYY-MM-DD).")
    ] = None,
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show LLM calls and tokens today and this month (UTC), per guild and per model.

    Example: kotonoha usage --json
    """
    settings = get_settings()
    try:
        today = date.fromisoformat(day) if day else utcnow().date()
    except ValueError:
        raise fail(f"--day {day!r}: use YYYY-MM-DD", 2) from None
    async with open_database(database_url(settings, database), settings=settings) as db:
        summary = await UsageMeter(db, settings).summary(guild, today=today)
    if as_json:
        print_json(
            {
                **summary.as_dict(),
                "budgets": {
                    "guild_daily_tokens": settings.guild_daily_token_budget or None,
                    "user_daily_tokens": settings.user_daily_token_budget or None,
                },
            }
        )
        return

    def row(table: Table, label: str, t: Totals) -> None:
        table.add_row(
            label, str(t.calls), f"{t.input_tokens:,}", f"{t.output_tokens:,}", f"{t.tokens:,}"
        )

    scope = "all guilds" if guild is None else ("DMs" if guild == 0 else f"guild {guild}")
    table = Table(title=f"LLM usage, {scope} (UTC)")
    for name in ("", "calls", "input tokens", "output tokens", "total"):
        table.add_column(name, justify="right" if name else "left")
    row(table, f"today {today.isoformat()}", summary.day)
    row(table, f"month {today.strftime('%Y-%m')}", summary.month)
    for model, totals in sorted(summary.month_by_model.items()):
        row(table, f"  model {model}", totals)
    if guild is None:
        for gid, totals in sorted(summary.month_by_guild.items()):
            row(table, f"  {'DMs' if gid == 0 else f'guild {gid}'}", totals)
    out_console.print(table)
    if not summary.month.calls:
        err_console.print("no LLM calls recorded this month")
