"""What each transfer step reports: per-table counts, verification diffs, progress hooks.

The CLI prints these (or their ``as_dict()`` as JSON); the library never prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kotonoha_bot.errors import MigrationError
from kotonoha_bot.models import EmbeddingConfig

#: Exit code of `db migrate` when it finished but quarantined rows.
EXIT_QUARANTINED = 3


class TransferProgress:
    """Progress callbacks (the CLI draws rich bars; the library default is silent)."""

    def begin(self, task: str, total: int | None) -> None:
        """A step starts (``total`` rows, None when unknown)."""

    def advance(self, task: str, rows: int) -> None:
        """``rows`` more rows done."""

    def end(self, task: str) -> None:
        """The step is done."""

    def note(self, message: str) -> None:
        """A one-line status message."""


class VerificationFailedError(MigrationError):
    """The copy finished but the target differs from the source; ``report`` says how."""

    def __init__(self, message: str, report: MigrationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class TableReport:
    """One table's part of a migration."""

    table: str
    source_rows: int = 0
    moved: int = 0
    already_present: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    #: For a legacy source: rows (or messages) in the legacy file, before conversion.
    legacy_rows: int | None = None


@dataclass
class TableDiff:
    """How one table of the target compares with the (converted) source."""

    table: str
    expected_rows: int = 0
    target_rows: int = 0
    matching: int = 0
    missing_count: int = 0
    extra_count: int = 0
    differing_count: int = 0
    invalid_count: int = 0
    source_quarantined: int = 0
    vectors_compared: int = 0
    missing: list[Any] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)
    differing: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    expected_checksum: str = ""
    target_checksum: str = ""

    @property
    def identical(self) -> bool:
        return not (self.missing_count or self.extra_count or self.differing_count) and not (
            self.invalid_count
        )


@dataclass
class VerifyReport:
    """The outcome of :func:`compare`: identical only when every check passed."""

    source: str
    target: str
    tables: dict[str, TableDiff]
    integrity: dict[str, int]
    marker: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return (
            all(t.identical for t in self.tables.values())
            and not any(self.integrity.values())
            and self.marker is None
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["identical"] = self.identical
        return out


@dataclass
class MigrationReport:
    """What a migration (or a dry run) did."""

    source: str
    target: str
    source_kind: str
    dry_run: bool
    mode: str = "fresh"  # fresh | resume | restart
    timezone: str = ""
    backup_path: Path | None = None
    quarantine_path: Path | None = None
    tables: dict[str, TableReport] = field(default_factory=dict)
    conversions: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    quarantine_samples: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message_counts_fixed: int = 0
    embedding: EmbeddingConfig | None = None
    verify: VerifyReport | None = None
    seconds: float = 0.0
    legacy: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINED if self.quarantined else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # (asdict rebuilds a Counter from its items, which would count the pairs.)
        out["conversions"] = dict(self.conversions)
        out["verify"] = self.verify.as_dict() if self.verify else None
        out["exit_code"] = self.exit_code
        for key in ("backup_path", "quarantine_path"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out


@dataclass
class UpgradeReport:
    """What `db upgrade` did to a legacy file."""

    path: Path
    backup_path: Path | None
    quarantine_path: Path | None
    quarantined: int
    timezone: str
    legacy: dict[str, Any]
    conversions: Counter[str]
    warnings: list[str]
    verify: VerifyReport | None
    already_current: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINED if self.quarantined else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["conversions"] = dict(self.conversions)
        out["verify"] = self.verify.as_dict() if self.verify else None
        for key in ("path", "backup_path", "quarantine_path"):
            out[key] = str(out[key]) if out[key] is not None else None
        out["exit_code"] = self.exit_code
        return out


@dataclass
class BackupResult:
    """What ``backup_database`` wrote."""

    path: Path
    method: str  # sqlite-online-backup | pg_dump | logical-export
    size_bytes: int
    seconds: float
    manifest: Path | None = None
    rotated: list[Path] = field(default_factory=list)
    rows: int = 0
    note: str = ""


@dataclass
class RestoreResult:
    """What ``restore_backup`` did."""

    path: Path
    target: str
    method: str  # migrate | pg_restore
    verified: str
    seconds: float
    wiped: bool
    report: MigrationReport | None = None
    safety_copy: Path | None = None
