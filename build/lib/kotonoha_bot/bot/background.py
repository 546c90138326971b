"""Periodic jobs inside the bot (archiving, pending embeddings, batch saves, retention)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from kotonoha_bot.errors import KotonohaError

log = logging.getLogger("kotonoha_bot.bot")

Job = Callable[[], Awaitable[object]]


class Periodic:
    """Runs ``job`` every ``interval`` seconds until stopped; a failure never stops it."""

    def __init__(self, name: str, interval: float, job: Job, *, first_delay: float | None = None):
        if interval <= 0:
            raise ValueError(f"{name}: interval must be positive")
        self.name = name
        self.interval = interval
        self.first_delay = interval if first_delay is None else first_delay
        self._job = job
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        self.failures = 0

    @property
    def running(self) -> bool:
        """True while the loop task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop (idempotent)."""
        if not self.running:
            self._task = asyncio.create_task(self._loop(), name=f"kotonoha:{self.name}")

    async def stop(self) -> None:
        """Cancel the loop and wait for it (a job in progress is cancelled too)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> None:
        """One run of the job, failures logged."""
        try:
            await self._job()
        except KotonohaError as exc:
            self.failures += 1
            log.warning("%s failed: %s: %s", self.name, type(exc).__name__, exc)
        except Exception:
            # A background loop must outlive any bug in one run; the traceback is
            # logged (redacted by the logging setup) and the next run tries again.
            self.failures += 1
            log.exception("%s failed unexpectedly", self.name)
        finally:
            self.runs += 1

    async def _loop(self) -> None:
        await asyncio.sleep(self.first_delay)
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)
