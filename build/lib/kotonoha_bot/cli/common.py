"""What every command shares: settings, the --database option, clean errors.

Commands are thin: open the database, call one library function, print. Library
errors become one line on stderr and an exit code, never a traceback:
exit 1 for an operational failure, exit 2 for bad settings or usage.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from kotonoha_bot.config import Settings, load_settings
from kotonoha_bot.errors import ConfigError, KotonohaError
from kotonoha_bot.redact import redact

T = TypeVar("T")

#: Human output goes to stderr so that --json stdout stays one clean document.
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        "-d",
        help="Database URL (sqlite:///path.db or postgresql://...); default from settings.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one red line (secrets redacted) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {redact(message)}", soft_wrap=True)
    return typer.Exit(code)


def get_settings() -> Settings:
    """Load settings (or exit 2 with the one-line message) and set up redacting logs."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    from kotonoha_bot.logging_setup import setup_logging

    setup_logging(settings)
    if settings.log_level != "DEBUG":
        # One line per HTTP request from the SDKs' client is noise on a terminal.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return settings


def database_url(settings: Settings, override: str | None) -> str:
    """The URL a command should open: --database wins over the settings."""
    return override if override else settings.database_location()


def run_async(coro_fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Decorator: run an async command body; KotonohaError -> one line, exit code."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except ConfigError as exc:
            raise fail(str(exc), 2) from None
        except KotonohaError as exc:
            raise fail(f"{type(exc).__name__}: {exc}", 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper


def print_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()
