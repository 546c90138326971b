"""What the status page shows: storage facts, the bot's health, the pause switch, backups.

The health of Discord and the LLM comes from the bot itself: inside ``kotonoha run``
(``DASHBOARD_PORT`` set) straight from the running client and pipeline; from a
separate ``kotonoha dashboard`` process, from the bot's health server (``/ready`` on
``HEALTH_HOST:HEALTH_PORT``, with ``HEALTH_TOKEN`` when set), which reports whether
Discord is connected and how the last LLM calls went. When neither is reachable the
page says "unknown" rather than guessing.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from kotonoha_bot.chat.llm_health import LLMHealth
from kotonoha_bot.config import Settings
from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import KotonohaError
from kotonoha_bot.health import latest_schema_version
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider, embedding_config
from kotonoha_bot.models import (
    BackupRecord,
    DatabaseStats,
    EmbeddingConfig,
    PauseState,
    VectorIndexState,
)

log = logging.getLogger("kotonoha_bot.dashboard")

#: Seconds the bot's health server may take to answer the status page.
PROBE_TIMEOUT = 1.5


@dataclass
class BotLink:
    """How the dashboard learns the running bot's health (see the module docstring)."""

    discord_ready: Callable[[], bool] | None = None
    llm_health: LLMHealth | None = None
    #: A guild's name from the connected client's cache (None: unknown).
    guild_name: Callable[[int], str | None] | None = None


@dataclass
class BotHealth:
    """Discord and LLM as the page shows them (None: unknown)."""

    discord: bool | None = None
    llm: dict[str, Any] | None = None
    source: str = ""


@dataclass
class StatusReport:
    """Everything on the status page."""

    stats: DatabaseStats
    expected_schema: int | None
    index: VectorIndexState
    pause: PauseState
    recorded_embedding: EmbeddingConfig | None
    live_embedding: EmbeddingConfig | None
    last_backup: BackupRecord | None
    last_backup_failure: BackupRecord | None
    migration_marker: dict[str, Any] | None
    health: BotHealth
    versions: dict[str, str] = field(default_factory=dict)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


async def probe_bot(settings: Settings) -> BotHealth:
    """Ask the bot's health server (``/ready``) how Discord and the LLM are doing."""
    if settings.health_port == 0:
        return BotHealth(source="")
    import aiohttp

    host = "127.0.0.1" if settings.health_host in ("0.0.0.0", "", "::") else settings.health_host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.health_port}/ready"
    headers = {}
    if settings.health_token:
        headers["Authorization"] = f"Bearer {settings.health_token.get_secret_value()}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as http,
            http.get(url, headers=headers) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug("the bot's health server did not answer: %s", type(exc).__name__)
        return BotHealth(source="")
    if not isinstance(body, dict):
        return BotHealth(source="")
    discord = body.get("discord_connected")
    llm = body.get("llm")
    return BotHealth(
        discord=discord if isinstance(discord, bool) else None,
        llm=llm if isinstance(llm, dict) else None,
        source=f"{host}:{settings.health_port}/ready",
    )


async def bot_health(link: BotLink | None, settings: Settings) -> BotHealth:
    """In-process facts when the dashboard runs inside the bot, else the bot's /ready."""
    if link is not None and (link.discord_ready is not None or link.llm_health is not None):
        discord = None
        if link.discord_ready is not None:
            try:
                discord = bool(link.discord_ready())
            except Exception:  # a health probe must never break the page
                discord = False
        return BotHealth(
            discord=discord,
            llm=link.llm_health.as_dict() if link.llm_health is not None else None,
            source="this process",
        )
    return await probe_bot(settings)


async def gather_status(
    db: DatabaseProtocol,
    url: str,
    settings: Settings,
    embedder: EmbeddingProvider | None,
    link: BotLink | None,
) -> StatusReport:
    """Read everything the status page shows (each part is one cheap query)."""
    from kotonoha_bot.transfer.marker import migration_marker

    stats = await db.stats()
    index, pause, recorded = await asyncio.gather(
        db.vector_index_state(), db.pause_state(), db.get_embedding_config()
    )
    last_ok = await db.last_backup()
    last_failed = await db.last_backup(failed=True)
    try:
        marker = await migration_marker(url, settings)
    except KotonohaError as exc:
        marker = {"error": str(exc)}
    details = stats.details
    versions = {
        "kotonoha-bot": _version("kotonoha-bot"),
        "python": platform.python_version(),
    }
    for key in ("sqlite_version", "server_version", "pgvector_version"):
        if key in details:
            versions[key.removesuffix("_version")] = str(details[key])
    return StatusReport(
        stats=stats,
        expected_schema=latest_schema_version(db),
        index=index,
        pause=pause,
        recorded_embedding=recorded,
        live_embedding=embedding_config(embedder) if embedder is not None else None,
        last_backup=last_ok,
        last_backup_failure=last_failed,
        migration_marker=marker,
        health=await bot_health(link, settings),
        versions=versions,
    )
