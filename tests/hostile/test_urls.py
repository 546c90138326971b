"""Database URLs: parsed once, strictly; the password in no message, output or log line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from kotonoha_bot.config import Settings, load_settings
from kotonoha_bot.db import DatabaseURL, open_database
from kotonoha_bot.db.url import InvalidDatabaseURLError
from kotonoha_bot.errors import ConfigError, DatabaseUnavailableError
from kotonoha_bot.logging_setup import register_secrets, setup_logging, url_passwords
from tests.hostile.cases import CASES, Case
from tests.hostile.runner import check_case
from tests.hostile.support import PASSWORD
from tests.pg import PgServer

AREA = [c for c in CASES if c.area == "urls"]
PW = PASSWORD

MALFORMED = [
    f"kotonoha:{PW}@localhost/kotonoha",
    f"postgresql//kotonoha:{PW}@localhost/kotonoha",
    f"postgres:/kotonoha:{PW}@localhost/kotonoha",
    f"postgresql://kotonoha:pa/{PW}@localhost/kotonoha",
    f"postgresql://kotonoha:pa#{PW}@localhost/kotonoha",
    f"postgresql://kotonoha:pa?{PW}@localhost/kotonoha",
    f"postgresql://kotonoha:p@{PW}@localhost/kotonoha",
    f"postgresql://kotonoha:{PW}@[::1/kotonoha",
    f"postgresql://kotonoha:{PW}@localhost:notaport/kotonoha",
    f"postgresql://kotonoha:{PW}@localhost:99999/kotonoha",
    f"postgresql://kotonoha:{PW}/kotonoha",
    f"mysql://kotonoha:{PW}@localhost/db",
    f" postgresql://kotonoha:{PW}@localhost/kotonoha",
    "sqlite://relative.db",
    "sqlite:///",
    "sqlite:///:memory:",
    "",
]

WELL_FORMED = [
    # (text, backend, display)
    ("sqlite:///data/kotonoha.db", "sqlite", "sqlite:///data/kotonoha.db"),
    ("sqlite:////srv/k.db", "sqlite", "sqlite:////srv/k.db"),
    (f"postgresql://u:{PW}@db:5432/k", "postgresql", "postgresql://u:***@db:5432/k"),
    (f"postgres://u:{PW}@db/k", "postgresql", "postgres://u:***@db/k"),
    ("postgresql://u:p%2F%23%40q@db/k", "postgresql", "postgresql://u:***@db/k"),
    ("postgresql://u@[::1]:5433/k", "postgresql", "postgresql://u@[::1]:5433/k"),
    ("postgresql://u@/k?host=/run/postgresql", "postgresql",
     "postgresql://u@/k?host=/run/postgresql"),
    (f"postgresql+asyncpg://u:{PW}@db/k", "postgresql", "postgresql+asyncpg://u:***@db/k"),
    (f"postgresql://u@db/k?password={PW}", "postgresql", "postgresql://u@db/k?password=***"),
]  # fmt: skip


@pytest.mark.parametrize("case", AREA, ids=[c.slug for c in AREA])
def test_operator_case(case: Case, tmp_path: Path) -> None:
    check_case(case, tmp_path / "work")


@pytest.mark.parametrize("text", MALFORMED)
def test_a_malformed_url_is_refused_without_its_password(text: str) -> None:
    with pytest.raises(InvalidDatabaseURLError) as info:
        DatabaseURL.parse(text)
    message = str(info.value)
    assert PW not in message and "\n" not in message
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("text", [u for u in MALFORMED if u.strip().startswith(("postgres", "k"))])
def test_settings_refuse_a_malformed_url_naming_the_variable(text: str) -> None:
    for name in ("database_url", "database_read_url"):
        with pytest.raises(ConfigError) as info:
            load_settings(_env_file=None, database_type="postgres", **{
                "database_url": "postgresql://u@h/k", name: text})  # fmt: skip
        assert name.upper() in str(info.value) and PW not in str(info.value)


@pytest.mark.parametrize(("text", "backend", "display"), WELL_FORMED)
def test_well_formed_urls_parse_display_and_convert(text: str, backend: str, display: str) -> None:
    url = DatabaseURL.parse(text)
    assert url.backend == backend and url.display() == display and str(url) == display
    assert PW not in repr(url) and PW not in url.identity and PW not in url.label
    if backend == "postgresql":
        again = DatabaseURL.parse(url.dsn())
        assert (again.user, again.password, again.host, again.port, again.database) == (
            url.user, url.password, url.host, url.port, url.database)  # fmt: skip
        uri, env = url.libpq()
        assert PW not in uri
        assert env.get("PGPASSWORD") == url.password or url.secrets == list(env.values())


def test_two_spellings_of_one_database_have_one_identity(tmp_path: Path) -> None:
    a = DatabaseURL.parse("postgresql://u:x@db/k")
    b = DatabaseURL.parse("postgres://u:y@db:5432/k")
    assert a.identity == b.identity
    assert (
        DatabaseURL.parse("sqlite:///k.db").label
        != DatabaseURL.parse(f"sqlite:///{tmp_path}/k.db").label
    )  # same stem, other folder: other backups


@pytest.fixture
def captured_logs() -> Iterator[dict[str, io.StringIO]]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    yield streams
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize("text", [u for u in MALFORMED if PW in u])
def test_a_mistyped_url_in_a_log_line_is_redacted_in_both_formats(
    text: str, captured_logs: dict[str, io.StringIO], tmp_path: Path
) -> None:
    register_secrets(url_passwords(text))
    for fmt, stream in captured_logs.items():
        settings = Settings(_env_file=None, log_format=fmt, log_level="DEBUG")  # type: ignore[call-arg]
        handler = setup_logging(settings, stream=stream)
        logging.getLogger("kotonoha_bot.test").warning("connecting to %s", text)
        handler.flush()
        out = stream.getvalue()
        assert out and PW not in out, out
        if fmt == "json":
            json.loads(out.splitlines()[-1])


async def test_a_wrong_read_replica_is_named_as_the_replica(
    postgres_server: PgServer, settings: Settings, captured_logs: dict[str, io.StringIO]
) -> None:
    primary = await postgres_server.create_database("primary")
    try:
        replica = DatabaseURL.parse(postgres_server.url_for("no_such_replica"))
        read_url = replica.dsn().replace("postgresql://postgres:", f"postgresql://postgres:{PW}", 1)
        with_replica = settings.model_copy(update={"database_read_url": read_url})
        for fmt, stream in captured_logs.items():
            setup_logging(with_replica.model_copy(update={"log_format": fmt}), stream=stream)
            with pytest.raises(DatabaseUnavailableError) as info:
                async with open_database(primary, settings=with_replica):
                    pass
            message = str(info.value)
            assert "no_such_replica" in message and "/primary" not in message, message
            assert PW not in message and PW not in stream.getvalue()
    finally:
        await postgres_server.drop_database(primary)
