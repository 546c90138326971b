"""Fixtures of the bot tests: ``make_sim`` opens the real bot on a simulated Discord."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kotonoha_bot.db import DatabaseProtocol
from tests.bot.sim import Sim, SimFactory, sim_factory
from tests.fakes.api_server import FakeAPIServer, fake_api_fixture

_SIMS = pytest.StashKey[list[Sim]]()


@pytest.fixture
def make_sim(
    request: pytest.FixtureRequest, db: DatabaseProtocol, fake_api: FakeAPIServer, tmp_path: Path
) -> Iterator[SimFactory]:
    opened: list[Sim] = []
    request.node.stash[_SIMS] = opened
    yield sim_factory(db, fake_api, tmp_path, opened)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Attach SimCord's transcript (every event and REST call) to a failing test."""
    report = yield
    if report.when == "call" and report.failed:
        for sim in item.stash.get(_SIMS, []):
            text = sim.env.transcript()
            if text:
                report.sections.append(("simcord transcript", text))
    return report


fake_api = fake_api_fixture()
