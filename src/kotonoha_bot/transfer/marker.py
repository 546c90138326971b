"""The unfinished-migration marker: the one part of the transfer tool the bot reads.

A migration target gets ``kotonoha_meta['migration_in_progress']`` before its first
row, and loses it only after a clean verification. The bot refuses to start on a
database that carries it (half a community's history is worse than none), so
``bot/runtime.py`` imports this module, and only this one, from ``transfer/``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.dashboard_meta import BACKUP_FAILED_KEY, BACKUP_OK_KEY

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

#: kotonoha_meta key set on a target while a migration writes to it.
MIGRATION_MARKER = "migration_in_progress"
#: Meta keys about one database's own upkeep (its last backups), like the job leases:
#: never moved, never compared (a backup records itself in the source afterwards).
LOCAL_META_KEYS = (BACKUP_OK_KEY, BACKUP_FAILED_KEY)
#: Meta rows ``migrate`` leaves behind and ``verify`` ignores.
UNMOVED_META_KEYS = frozenset({MIGRATION_MARKER, *LOCAL_META_KEYS})


async def migration_marker(url: str, settings: Settings) -> dict[str, Any] | None:
    """The unfinished-migration marker of a database, or None (read-only)."""
    from kotonoha_bot.transfer.endpoints import endpoint_for

    info = await endpoint_for(url, settings).inspect()
    text = info.meta.get(MIGRATION_MARKER)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"value": text}
    return value if isinstance(value, dict) else {"value": value}
