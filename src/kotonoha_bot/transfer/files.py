"""Backup files on disk: timestamped names, rotation, private modes, where a backup goes.

Backups are named ``<label>-YYYYmmdd-HHMMSS-ffffff.(db|dump)`` (label: the SQLite file's
stem or the PostgreSQL database's name, with a hash of its identity); rotation keeps the
newest ``BACKUP_KEEP`` of one label and never touches another file. Files are created
readable by their owner only: they hold a community's conversations.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kotonoha_bot.errors import MigrationError
from kotonoha_bot.transfer.common import timestamped

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

MANIFEST_SUFFIX = ".manifest.json"
_STAMP = r"\d{8}-\d{6}-\d{6}"


def make_private(path: Path) -> None:
    """Readable by its owner only (best effort: some file systems keep no modes)."""
    with contextlib.suppress(OSError):
        path.chmod(0o600)


def make_dir(directory: Path) -> None:
    """Create a backup directory (and its parents) readable by its owner only."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)


def rotate(directory: Path, label: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups named ``label-<stamp>.(db|dump)``."""
    pattern = re.compile(rf"^{re.escape(label)}-{_STAMP}\.(db|dump)$")
    if not directory.is_dir():
        return []
    ours = sorted((p for p in directory.iterdir() if pattern.match(p.name)), reverse=True)
    removed = []
    for old in ours[keep:]:
        old.unlink(missing_ok=True)
        Path(str(old) + MANIFEST_SUFFIX).unlink(missing_ok=True)
        removed.append(old)
    return removed


def destination(
    settings: Settings, label: str, output: str | Path | None, suffix: str
) -> tuple[Path, Path | None]:
    """The file to write and the directory to rotate (None: an explicit file name).

    ``output`` is read as the operator wrote it: a trailing ``/`` means a directory
    even before it exists (``Path`` would drop the slash and make it a file name that
    every later run overwrites). An explicit file that exists is never overwritten.
    """
    if output is not None:
        text = str(output)
        as_dir = text.endswith(("/", os.sep)) or Path(text).is_dir()
        if not as_dir:
            dest = Path(text).resolve()
            if dest.exists():
                raise MigrationError(
                    f"{dest} already exists; give a new file name, or a directory"
                    " (ending in /) to get timestamped, rotated backups"
                )
            return dest, None
    directory = Path(output if output is not None else settings.backup_dir).resolve()
    return timestamped(directory, label, suffix), directory
