"""Shared fixtures: a real SQLite file per test and a real PostgreSQL per session.

``database_url`` is parametrized over both backends; every test that uses it (or
``db``) runs on both. Tests never branch on the backend name: where behaviour
differs they look at ``db.capabilities``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.db import DatabaseProtocol, open_database
from tests.pg import PgServer, pg_server

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    with pg_server() as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings isolated from the developer's environment and .env."""
    monkeypatch.chdir(tmp_path)
    return Settings(_env_file=None, database_path=tmp_path / "kotonoha.db")  # type: ignore[call-arg]


@pytest.fixture
async def new_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """A factory: ``await new_database_url(kind)`` gives a fresh, empty database URL."""
    created: list[str] = []
    counter = iter(range(1_000_000))

    async def make(kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'db{next(counter)}.db'}"
        server: PgServer = request.getfixturevalue("postgres_server")
        url = await server.create_database()
        created.append(url)
        return url

    yield make
    if created:
        server = request.getfixturevalue("postgres_server")
        for url in created:
            await server.drop_database(url)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, new_database_url: object) -> str:
    return await new_database_url(backend)  # type: ignore[operator,no-any-return]


@pytest.fixture
async def db(database_url: str, settings: Settings) -> AsyncIterator[DatabaseProtocol]:
    async with open_database(database_url, settings=settings) as database:
        yield database
