"""What both backends' dashboard mixins share: the operator's switches and one query.

The pause switch and the last backup outcomes are rows of ``kotonoha_meta`` (key,
JSON value) rather than a table of their own: every process sharing the database
reads them with one primary-key lookup, no migration is needed, and the transfer
tool moves and verifies them with the rest of ``kotonoha_meta`` (a migrated bot stays
paused). A row that does not decode (edited by hand) reads as "not set", never as an
error that would stop the bot from answering.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from kotonoha_bot.models import BackupRecord, PauseState

#: Present while the bot is paused: {"since": ISO time, "by": who paused it}.
PAUSE_KEY = "bot_paused"
#: The latest successful and failed backups.
BACKUP_OK_KEY = "last_backup_ok"
BACKUP_FAILED_KEY = "last_backup_failed"

#: Every guild id that has any stored row (DMs and the no-guild usage row excluded).
GUILDS_SQL = (
    "SELECT g.guild_id,"
    " (SELECT count(*) FROM sessions s WHERE s.guild_id = g.guild_id),"
    " (SELECT count(*) FROM knowledge_sources k WHERE k.guild_id = g.guild_id),"
    " (SELECT count(*) FROM knowledge_chunks c WHERE c.guild_id = g.guild_id),"
    " (SELECT count(*) FROM memories m WHERE m.guild_id = g.guild_id),"
    " (SELECT max(s.last_active_at) FROM sessions s WHERE s.guild_id = g.guild_id)"
    " FROM (SELECT guild_id FROM sessions WHERE guild_id IS NOT NULL"
    "  UNION SELECT guild_id FROM knowledge_sources"
    "  UNION SELECT guild_id FROM memories WHERE guild_id IS NOT NULL"
    "  UNION SELECT guild_id FROM llm_usage WHERE guild_id <> 0) g"
    " ORDER BY g.guild_id"
)


def backup_key(failed: bool) -> str:
    """The meta key of the latest success or failure."""
    return BACKUP_FAILED_KEY if failed else BACKUP_OK_KEY


def _load(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def encode_pause(since: datetime, by: str) -> str:
    """The stored value of a pause."""
    return json.dumps({"since": since.isoformat(), "by": by}, ensure_ascii=False)


def decode_pause(text: str | None) -> PauseState:
    """The pause state of a stored value (None or unreadable: running)."""
    value = _load(text)
    if value is None:
        return PauseState(paused=False)
    by = value.get("by")
    return PauseState(paused=True, since=_time(value.get("since")), by=by if by else None)


def encode_backup(record: BackupRecord) -> str:
    """The stored value of a backup outcome."""
    return json.dumps(
        {
            "at": record.at.isoformat(),
            "ok": record.ok,
            "path": record.path,
            "method": record.method,
            "size_bytes": record.size_bytes,
            "error": record.error,
        },
        ensure_ascii=False,
    )


def decode_backup(text: str | None) -> BackupRecord | None:
    """The backup outcome of a stored value, or None."""
    value = _load(text)
    at = _time(value.get("at")) if value else None
    if value is None or at is None:
        return None
    size = value.get("size_bytes")
    return BackupRecord(
        at=at,
        ok=bool(value.get("ok")),
        path=str(value.get("path") or ""),
        method=str(value.get("method") or ""),
        size_bytes=size if isinstance(size, int) and not isinstance(size, bool) else 0,
        error=str(value.get("error") or ""),
    )
