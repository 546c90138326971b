"""`kotonoha db ...`: create, inspect and maintain the database."""

from __future__ import annotations

import dataclasses

import typer
from rich.table import Table

from kotonoha_bot.cli.common import (
    DatabaseOption,
    JsonOption,
    database_url,
    err_console,
    get_settings,
    out_console,
    print_json,
    run_async,
)
from kotonoha_bot.db import open_database

app = typer.Typer(help="Create, inspect and maintain the database.", no_args_is_help=True)


@app.command("init")
@run_async
async def init(database: DatabaseOption = None) -> None:
    """Create the database (or upgrade its schema) and report where it is.

    Example: kotonoha db init --database sqlite:///data/kotonoha.db
    """
    settings = get_settings()
    async with open_database(database_url(settings, database), settings=settings) as db:
        version = await db.schema_version()
        err_console.print(f"database ready: {db.location} (schema version {version})")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@app.command("status")
@run_async
async def status(database: DatabaseOption = None, as_json: JsonOption = False) -> None:
    """Show counts, schema version, embedding model and size (no password is printed).

    Example: kotonoha db status --json
    """
    settings = get_settings()
    async with open_database(database_url(settings, database), settings=settings) as db:
        stats = await db.stats()
    if as_json:
        print_json(dataclasses.asdict(stats))
        return
    table = Table(title="kotonoha database", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("backend", stats.backend)
    table.add_row("location", stats.location)
    table.add_row("schema version", str(stats.schema_version))
    table.add_row("sessions", str(stats.sessions))
    table.add_row("messages", str(stats.messages))
    table.add_row("knowledge sources", str(stats.sources))
    table.add_row("knowledge chunks", str(stats.chunks))
    table.add_row("chunks awaiting embedding", str(stats.pending_chunks))
    emb = stats.embedding
    table.add_row("embedding", f"{emb.model} ({emb.dimension} dims)" if emb else "not recorded yet")
    table.add_row("size on disk", _size(stats.size_bytes))
    for key, value in stats.details.items():
        table.add_row(key, str(value))
    out_console.print(table)
