"""The `kotonoha` command: thin wrappers over the library.

Each command group lives in its own module and is registered here.
"""

from __future__ import annotations

import typer

from kotonoha_bot.cli import db as db_cli

app = typer.Typer(
    name="kotonoha",
    help="kotonoha-bot: a Discord companion bot that remembers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cli.app, name="db")


def main() -> None:
    """Console-script entry point."""
    app()
