"""Fixtures of the dashboard tests: the real app on a real database, a real Chromium.

``dashboard`` serves the production app (uvicorn on a free loopback port) over the
``db`` fixture (SQLite file or PostgreSQL) filled with the example data; ``browser`` is
one headless Chromium for the whole session (started once: it is the slow part);
``page`` is a fresh context logged in through the login form.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kotonoha_bot.config import Settings
from kotonoha_bot.dashboard.app import Backend
from kotonoha_bot.dashboard.example import ExampleData, write_example_data
from kotonoha_bot.dashboard.server import DashboardServer
from kotonoha_bot.db import DatabaseProtocol
from kotonoha_bot.knowledge.embeddings import create_embedding_provider
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider
from tests.bot.conftest import fake_api, make_sim  # noqa: F401 (the bot on SimCord, for the pause test)
from tests.dashboard.browser import chromium_path, launch_chromium

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "dashboard-test-token-4f1c9a27"


@dataclass
class Running:
    """A served dashboard and what it serves."""

    server: DashboardServer
    db: DatabaseProtocol
    settings: Settings
    embedder: EmbeddingProvider
    example: ExampleData

    @property
    def url(self) -> str:
        return self.server.url

    def client(
        self, *, bearer: bool = False, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.AsyncClient:
        headers = {**({"Authorization": f"Bearer {TOKEN}"} if bearer else {}), **(headers or {})}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kw)


def dashboard_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_path": tmp_path / "kotonoha.db",
        "backup_dir": tmp_path / "backups",
        "embedding_provider": "hashing",
        "health_port": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def dashboard(
    db: DatabaseProtocol, database_url: str, tmp_path: Path
) -> AsyncIterator[Running]:
    settings = dashboard_settings(tmp_path)
    embedder = create_embedding_provider(settings)
    example = await write_example_data(db, embedder, ROOT / "examples" / "corpus")
    backend = Backend(db, settings, database_url, embedder=lambda: embedder)
    server = DashboardServer(backend, token=TOKEN, host="127.0.0.1", port=0)
    await server.start()
    try:
        yield Running(server, db, settings, embedder, example)
    finally:
        await server.stop()
        await embedder.aclose()


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: /usr/bin/chromium is missing")
        pytest.skip("no Chromium (apt-get install chromium; make test installs it as root)")
    async with launch_chromium() as launched:
        yield launched


async def logged_in(browser: Any, url: str, *, locale: str = "en", **context: Any) -> Any:
    """A new browser context logged in through the form; returns its page."""
    ctx = await browser.new_context(locale=locale, **context)
    page = await ctx.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto(url + "/login")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(url + "/status")
    return page


@pytest.fixture
async def page(browser: Any, dashboard: Running) -> AsyncIterator[Any]:
    p = await logged_in(browser, dashboard.url)
    try:
        yield p
    finally:
        await p.context.close()
