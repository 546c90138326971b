"""``kotonoha db upgrade``: turn a legacy SQLite file into the current schema in place.

Only a database that is one file has a legacy format (the endpoint's ``file``); the
file is integrity-checked and backed up first, converted in one transaction, and the
result verified against the backup converted by the same rules.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from kotonoha_bot.db.sqlite.rows import inspect_file, integrity_check, online_backup
from kotonoha_bot.errors import ConfigError, CorruptDatabaseError, MigrationError
from kotonoha_bot.transfer.common import resolve_timezone, timestamped
from kotonoha_bot.transfer.endpoints import endpoint_for
from kotonoha_bot.transfer.legacy import legacy_summary, upgrade_in_place
from kotonoha_bot.transfer.quarantine import Quarantine
from kotonoha_bot.transfer.reports import TransferProgress, UpgradeReport
from kotonoha_bot.transfer.verify import verify

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings


async def upgrade(
    url: str,
    *,
    settings: Settings,
    source_timezone: str | None = None,
    backup_dir: Path | None = None,
    quarantine_path: Path | None = None,
    progress: TransferProgress | None = None,
) -> UpgradeReport:
    """Upgrade a legacy SQLite file to the current schema in place, after a backup.

    The conversion is one transaction in the file itself; afterwards the upgraded file
    is verified against the backup (converted by the same rules).
    """

    progress = progress or TransferProgress()
    path = endpoint_for(url, settings).file
    if path is None:
        raise ConfigError("`db upgrade` converts legacy SQLite files; PostgreSQL has no legacy")
    timezone, tz_label = resolve_timezone(source_timezone)
    info = await asyncio.to_thread(inspect_file, path)
    if info.kind == "current":
        return UpgradeReport(
            path, None, None, 0, tz_label, {}, Counter(), [], None, already_current=True
        )
    if info.kind == "missing":
        raise MigrationError(f"{path} does not exist")
    if info.kind != "legacy":
        raise MigrationError(f"{path} is not a legacy kotonoha database ({info.kind})")
    try:
        await asyncio.to_thread(integrity_check, path)
    except CorruptDatabaseError as exc:
        raise MigrationError(f"{exc}; nothing was changed") from None
    directory = backup_dir or settings.backup_dir
    backup = timestamped(directory, f"{path.stem}-legacy", ".db")
    progress.note(f"backing up {path} -> {backup}")
    await asyncio.to_thread(online_backup, path, backup)
    qpath = quarantine_path or timestamped(directory, "kotonoha-quarantine", ".jsonl")
    quarantine = Quarantine(qpath)
    progress.begin("upgrade legacy sessions", info.counts.get("sessions"))
    try:
        result = await asyncio.to_thread(
            upgrade_in_place,
            path,
            timezone=timezone,
            quarantine=quarantine.add,
            on_session=lambda: progress.advance("upgrade legacy sessions", 1),
        )
    finally:
        quarantine.close()
        progress.end("upgrade legacy sessions")
    warnings = []
    if result.ignored_fields:
        warnings.append(
            "legacy message fields not moved: "
            + ", ".join(f"{k} ({n}x)" for k, n in sorted(result.ignored_fields.items()))
        )
    if result.ignored_columns:
        warnings.append("legacy columns not moved: " + ", ".join(result.ignored_columns))
    report = UpgradeReport(
        path=path,
        backup_path=backup.resolve(),
        quarantine_path=qpath.resolve() if quarantine.count else None,
        quarantined=quarantine.count,
        timezone=tz_label,
        legacy=legacy_summary(result),
        conversions=result.stats,
        warnings=warnings,
        verify=None,
    )
    progress.note("verifying the upgraded file against the backup")
    report.verify = await verify(
        f"sqlite:///{backup}",
        url,
        settings=settings,
        source_timezone=source_timezone,
        progress=progress,
    )
    if not report.verify.identical:
        raise MigrationError(
            f"the upgraded {path} does not match its backup; the original is at {backup}"
        )
    return report
