"""Logging never shows a secret: not in messages, exception text or tracebacks.

The token, API keys and database passwords are set to unique markers; errors whose
messages, causes, notes and traceback *source lines* contain them are logged at
DEBUG in both formats, and the captured output must not contain any marker.
A control test proves the same records do leak through a plain formatter, so the
checks can fail.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import open_database
from kotonoha_bot.logging_setup import (
    JsonFormatter,
    RedactingTextFormatter,
    secret_values,
    setup_logging,
    url_passwords,
)

TOKEN = "DTOKEN-4c1f9e2a-MARKER"
OPENAI_KEY = "sk-OPENAI-77b3d0e5-MARKER"
ANTHROPIC_KEY = "sk-ant-ANTHRO-0a9c4e1b-MARKER"
PG_PASSWORD = "PGPASS-5e8d2c7f-MARKER"
# Percent-encoded in the URL: both spellings must disappear.
READ_PASSWORD_RAW = "RDPASS%2F91aa-MARKER"
READ_PASSWORD = "RDPASS/91aa-MARKER"
MARKERS = [TOKEN, OPENAI_KEY, ANTHROPIC_KEY, PG_PASSWORD, READ_PASSWORD_RAW, READ_PASSWORD]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, threading.excepthook)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)


def marker_settings(tmp_path: Path, log_format: str) -> Settings:
    values: dict[str, Any] = {
        "database_type": "postgres",
        "database_url": "postgresql://kotonoha:PGPASS-5e8d2c7f-MARKER@127.0.0.1:1/kotonoha",
        "database_read_url": "postgresql://reader:RDPASS%2F91aa-MARKER@127.0.0.1:1/kotonoha",
        "database_path": tmp_path / "k.db",
        "discord_token": TOKEN,
        "openai_api_key": OPENAI_KEY,
        "anthropic_api_key": ANTHROPIC_KEY,
        "log_level": "DEBUG",
        "log_format": log_format,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def emit_secret_laden_records(settings: Settings) -> None:
    """Log, at DEBUG and ERROR, everything that could carry a secret."""
    log = logging.getLogger("kotonoha_bot.test")
    log.debug("token=%s openai=%s anthropic=%s", TOKEN, OPENAI_KEY, ANTHROPIC_KEY)
    log.debug("settings url %s and raw password %s", settings.database_url, READ_PASSWORD)

    # A real connection failure through the storage layer (closed port: fails fast).
    # The URL literal sits on the source line, so the traceback quotes it.
    try:
        await open_database("postgresql://kotonoha:PGPASS-5e8d2c7f-MARKER@127.0.0.1:1/kotonoha", settings=settings).initialize()  # noqa: E501  # fmt: skip
    except Exception:
        log.exception("open_database failed")

    # The driver itself, with the percent-encoded password on the source line.
    import asyncpg

    try:
        await asyncio.wait_for(asyncpg.connect("postgresql://reader:RDPASS%2F91aa-MARKER@127.0.0.1:1/kotonoha"), 10)  # noqa: E501  # fmt: skip
    except Exception:
        log.exception("asyncpg connect failed")

    # Secrets in the message, the cause and a note of a chained exception.
    try:
        try:
            raise ValueError(f"anthropic rejected {ANTHROPIC_KEY}")
        except ValueError as inner:
            err = RuntimeError(f"openai rejected key {OPENAI_KEY} (token {TOKEN})")
            err.add_note(f"read replica password {READ_PASSWORD}")
            raise err from inner
    except RuntimeError:
        log.error("LLM call failed", exc_info=True)

    # stack_info path.
    log.debug("where did %s come from", PG_PASSWORD, stack_info=True)


def assert_clean(output: str) -> None:
    leaked = [m for m in MARKERS if m in output]
    assert not leaked, f"secrets leaked into the log: {leaked}"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_reaches_the_log(
    log_format: str, tmp_path: Path, restore_logging: None
) -> None:
    settings = marker_settings(tmp_path, log_format)
    stream = io.StringIO()
    setup_logging(settings, stream=stream)
    await emit_secret_laden_records(settings)
    output = stream.getvalue()

    assert_clean(output)
    # The records really carried the secrets and the tracebacks really were written.
    assert output.count("***") >= 8
    assert "open_database failed" in output
    assert "asyncpg connect failed" in output
    assert "Traceback (most recent call last)" in output
    assert "postgresql://kotonoha:***@127.0.0.1:1/kotonoha" in output
    assert "RuntimeError: openai rejected key ***" in output
    # The traceback source lines (which quote the URLs) were printed, redacted.
    assert "reader:***@127.0.0.1:1/kotonoha" in output
    assert "settings=settings).initialize()" in output
    assert "DatabaseUnavailableError" in output  # the backend's own error, redacted too

    if log_format == "json":
        parsed = [json.loads(line) for line in output.splitlines()]  # every line is JSON
        for doc in parsed:
            assert set(doc) >= {"ts", "level", "logger", "message", "exc"}
        docs = [d for d in parsed if d["logger"] == "kotonoha_bot.test"]
        assert len(docs) == 6
        assert [d["level"] for d in docs] == ["DEBUG", "DEBUG", "ERROR", "ERROR", "ERROR", "DEBUG"]
        assert docs[0]["exc"] is None
        assert all("Traceback" in d["exc"] for d in docs[2:5])
        assert "stack" in docs[5]
    else:
        assert not output.lstrip().startswith("{")


async def test_plain_formatter_would_leak(tmp_path: Path, restore_logging: None) -> None:
    """Control: without our formatter the same records show every marker."""
    settings = marker_settings(tmp_path, "text")
    setup_logging(settings, stream=io.StringIO())
    stream = io.StringIO()
    plain = logging.StreamHandler(stream)
    plain.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(plain)
    await emit_secret_laden_records(settings)
    output = stream.getvalue()
    # Our handler ran first and cached a redacted exc_text on the records, so even a
    # foreign handler's traceback is clean; the messages (args) are not.
    assert TOKEN in output and OPENAI_KEY in output and PG_PASSWORD in output
    assert "Traceback" in output


def test_json_lines_survive_secrets_that_need_escaping(restore_logging: None) -> None:
    """A secret with a quote and a backslash is removed before JSON encoding."""
    from kotonoha_bot.redact import register_secret

    odd = 'odd"secret\\value-3b2a'
    register_secret(odd)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", (odd,), None)
    line = JsonFormatter().format(record)
    assert json.loads(line)["message"] == "key ***"
    assert "odd" not in line
    text = RedactingTextFormatter().format(record)
    assert "odd" not in text


def test_secret_values_from_settings(tmp_path: Path) -> None:
    values = secret_values(marker_settings(tmp_path, "text"))
    for marker in MARKERS:
        assert marker in values
    assert url_passwords("postgresql://u@h/db") == []
    assert url_passwords("sqlite:///x.db") == []
    assert url_passwords(None) == []


def test_uncaught_exception_is_redacted(tmp_path: Path) -> None:
    """The default excepthook would print the raw traceback; ours goes through logging."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os\n"
        "from kotonoha_bot.config import Settings\n"
        "from kotonoha_bot.logging_setup import setup_logging\n"
        "setup_logging(Settings(_env_file=None, log_format=os.environ['FMT']))\n"
        f"raise SystemError('boom with token {TOKEN}')  # {OPENAI_KEY}\n",
        encoding="utf-8",
    )
    for fmt in ("text", "json"):
        env = {
            "PATH": "/usr/bin:/bin",
            "FMT": fmt,
            "DISCORD_TOKEN": TOKEN,
            "OPENAI_API_KEY": OPENAI_KEY,
        }
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1
        output = proc.stdout + proc.stderr
        assert_clean(output)
        assert "uncaught exception" in output
        assert "SystemError: boom with token ***" in output
        if fmt == "json":
            doc = json.loads(proc.stderr.strip().splitlines()[-1])
            assert doc["level"] == "CRITICAL"
            assert "# ***" in doc["exc"]
