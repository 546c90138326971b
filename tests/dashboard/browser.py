"""Debian's Chromium driven by Playwright for Python, for the dashboard's tests and screenshots.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``
(``apt-get install chromium``; ``.ci/run`` and ``make test`` install it when missing)
with the flags this closed network needs (no background networking, no component
updates, no sync). ``launch`` gives the browser a fresh temporary profile
(``--user-data-dir``) of Playwright's own, removed when it closes; each test then
opens its own context (cookies, locale, viewport).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("KOTONOHA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def chromium_path() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    return found or None


@asynccontextmanager
async def launch_chromium() -> AsyncIterator[Any]:
    """One headless Chromium (a Playwright ``Browser``) for a whole test session."""
    from playwright.async_api import async_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (make test does as root)"
        )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()
