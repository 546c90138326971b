"""Logging for the whole process: text or JSON lines on stderr, secrets always removed.

Redaction runs on the *final* text of every record — message, arguments, exception
text and traceback (whose source lines may quote a URL with a password) — so no
code path can log a secret by accident. The secret values come from the settings
(``DISCORD_TOKEN``, ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, the passwords in
``DATABASE_URL``/``DATABASE_READ_URL``) and are handed to :mod:`kotonoha_bot.redact`.

Uncaught exceptions (main thread, other threads) are routed through logging too,
because Python's default hook prints the traceback straight to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote, urlsplit

from kotonoha_bot.redact import redact, register_secret

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Marks the handlers this module installed, so a second setup replaces them.
_OURS = "_kotonoha_handler"


class RedactingTextFormatter(logging.Formatter):
    """Plain text; the whole formatted record (traceback included) is redacted."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        # The cached record.exc_text is shared with other handlers: keep it clean too.
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, exc (and stack when asked).

    Every field is redacted *before* encoding: a secret containing a quote or a
    backslash would be escaped in the JSON text and slip past a search there.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exc: str | None = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            exc = record.exc_text
        elif record.exc_text:
            exc = record.exc_text
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(message),
            "exc": redact(exc) if exc else None,
        }
        if record.stack_info:
            document["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(document, ensure_ascii=False)

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        return redact(super().formatException(ei))


def secret_values(settings: Settings) -> list[str]:
    """The secret strings in ``settings`` (tokens, API keys, database passwords)."""
    values: list[str] = []
    for secret in (settings.discord_token, settings.openai_api_key, settings.anthropic_api_key):
        if secret is not None:
            values.append(secret.get_secret_value())
    for url in (settings.database_url, settings.database_read_url):
        values.extend(url_passwords(url))
    return [v for v in values if v]


def url_passwords(url: str | None) -> list[str]:
    """The password of a database URL, as written and percent-decoded."""
    if not url:
        return []
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    if not password:
        return []
    return list(dict.fromkeys([password, unquote(password)]))


def register_secrets(values: Iterable[str | None]) -> None:
    """Hand secret values to the redactor."""
    for value in values:
        register_secret(value)


def setup_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger from ``LOG_LEVEL``/``LOG_FORMAT``; returns the handler.

    Idempotent: a second call replaces the handler the first one installed.
    """
    register_secrets(secret_values(settings))
    formatter: logging.Formatter = (
        JsonFormatter() if settings.log_format == "json" else RedactingTextFormatter()
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _OURS, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OURS, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)
    _install_excepthooks()
    return handler


def _install_excepthooks() -> None:
    """Send uncaught exceptions through logging (redacted) instead of raw stderr."""

    def excepthook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        logging.getLogger("kotonoha_bot").critical(
            "uncaught exception", exc_info=(exc_type, exc, tb)
        )

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("kotonoha_bot").critical(
            "uncaught exception in thread %s",
            name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
