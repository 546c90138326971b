"""The `kotonoha` command: thin wrappers over the library.

Each command group lives in its own module and is registered here.
"""

from __future__ import annotations

import typer

from kotonoha_bot.cli import db as db_cli
from kotonoha_bot.cli import kb as kb_cli
from kotonoha_bot.cli.chat import chat
from kotonoha_bot.cli.dashboard import dashboard
from kotonoha_bot.cli.demo import demo
from kotonoha_bot.cli.run import run
from kotonoha_bot.cli.usage import usage

app = typer.Typer(
    name="kotonoha",
    help="kotonoha-bot: a Discord companion bot that remembers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cli.app, name="db")
app.add_typer(kb_cli.app, name="kb")
app.command("demo")(demo)
app.command("chat")(chat)
app.command("run")(run)
app.command("usage")(usage)
app.command("dashboard")(dashboard)


def main() -> None:
    """Console-script entry point."""
    app()
