"""The operator's dashboard: see and tend the bot's memory in a browser, without SQL.

Server-rendered pages (Starlette, Jinja2, htmx vendored as a static file; no Node
build step) over the same storage contract as the bot (:class:`DatabaseProtocol`):
status with the pause switch and backups, memory (sources, chunks with provenance,
explicit memories, uploads), a search playground, conversations and usage.

Run it as ``kotonoha dashboard`` (its own process) or, with ``DASHBOARD_PORT`` set,
inside ``kotonoha run``. It binds 127.0.0.1 by default and never starts without
``DASHBOARD_TOKEN``; see :mod:`kotonoha_bot.dashboard.auth` for the security model and
:mod:`kotonoha_bot.dashboard.app` for what every request passes. Starlette, Jinja2 and
uvicorn come with the ``[dashboard]`` extra, so the bot alone never imports them.
"""

from __future__ import annotations

from kotonoha_bot.dashboard.server import DashboardServer, dashboard_from_settings

__all__ = ["DashboardServer", "dashboard_from_settings"]
