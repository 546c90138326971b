"""`kotonoha db ...`: create, inspect, move, verify, back up and restore the database."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kotonoha_bot.cli.common import (
    DatabaseOption,
    JsonOption,
    database_url,
    err_console,
    fail,
    get_settings,
    out_console,
    print_json,
    run_async,
)
from kotonoha_bot.db import open_database
from kotonoha_bot.text import human_size
from kotonoha_bot.transfer.common import DEFAULT_BATCH, DEFAULT_MAX_DIFFS
from kotonoha_bot.transfer.copy import migrate
from kotonoha_bot.transfer.marker import migration_marker
from kotonoha_bot.transfer.reports import (
    EXIT_QUARANTINED,
    MigrationReport,
    TransferProgress,
    VerificationFailedError,
    VerifyReport,
)
from kotonoha_bot.transfer.upgrade import upgrade
from kotonoha_bot.transfer.verify import verify

app = typer.Typer(help="Create, inspect and maintain the database.", no_args_is_help=True)


@app.command("init")
@run_async
async def init(database: DatabaseOption = None) -> None:
    """Create the database (or upgrade its schema) and report where it is.

    Example: kotonoha db init --database sqlite:///data/kotonoha.db
    """
    settings = get_settings()
    async with open_database(database_url(settings, database), settings=settings) as db:
        version = await db.schema_version()
        err_console.print(f"database ready: {db.location} (schema version {version})")


@app.command("status")
@run_async
async def status(database: DatabaseOption = None, as_json: JsonOption = False) -> None:
    """Show counts, schema version, embedding model and size (no password is printed).

    Example: kotonoha db status --json
    """
    settings = get_settings()
    db_url = database_url(settings, database)
    async with open_database(db_url, settings=settings) as db:
        stats = await db.stats()
        marker = await migration_marker(db_url, settings)
    if as_json:
        document = dataclasses.asdict(stats)
        document["migration_in_progress"] = marker
        print_json(document)
        return
    if marker is not None:
        err_console.print(
            f"[bold yellow]warning:[/] this database holds an unfinished migration from"
            f" {marker.get('source', '?')} (started {marker.get('started_at', '?')});"
            " rerun `kotonoha db migrate` with the same source to finish it"
        )
    table = Table(title="kotonoha database", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("backend", stats.backend)
    table.add_row("location", stats.location)
    table.add_row("schema version", str(stats.schema_version))
    table.add_row("sessions", str(stats.sessions))
    table.add_row("messages", str(stats.messages))
    table.add_row("knowledge sources", str(stats.sources))
    table.add_row("knowledge chunks", str(stats.chunks))
    table.add_row("chunks awaiting embedding", str(stats.pending_chunks))
    emb = stats.embedding
    table.add_row("embedding", f"{emb.model} ({emb.dimension} dims)" if emb else "not recorded yet")
    table.add_row("size on disk", human_size(stats.size_bytes))
    for key, value in stats.details.items():
        table.add_row(key, str(value))
    out_console.print(table)


# --- moving data between databases -----------------------------------------------------

SourceOption = Annotated[
    str,
    typer.Option("--source", "-s", help="Database to read (sqlite:///... or postgresql://...)."),
]
TargetOption = Annotated[
    str, typer.Option("--target", "-t", help="Database to write (must be empty).")
]
TimezoneOption = Annotated[
    str | None,
    typer.Option(
        "--source-timezone",
        help="IANA zone of times stored without an offset (legacy databases);"
        " default: this host's zone.",
        show_default=False,
    ),
]
MaxDiffsOption = Annotated[
    int, typer.Option("--max-diffs", min=0, help="Differing keys listed per table.")
]


class _Bars(TransferProgress):
    """Transfer progress as rich bars on stderr, one per table."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def begin(self, task: str, total: int | None) -> None:
        self.tasks[task] = self.progress.add_task(task, total=total)

    def advance(self, task: str, rows: int) -> None:
        if task in self.tasks and rows:
            self.progress.advance(self.tasks[task], rows)

    def end(self, task: str) -> None:
        tid = self.tasks.get(task)
        if tid is not None:
            t = self.progress.tasks[tid]
            if t.total is None:
                self.progress.update(tid, total=t.completed)

    def note(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/]", soft_wrap=True)


def _bars(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not enabled,
    )


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 and rows else "-"


def _print_migration(report: MigrationReport) -> None:
    title = "dry run: what would move" if report.dry_run else "migration"
    table = Table(title=f"{title}: {report.source} -> {report.target}")
    table.add_column("table")
    table.add_column("source", justify="right")
    table.add_column("would move" if report.dry_run else "moved", justify="right")
    table.add_column("present", justify="right")
    table.add_column("quarantined", justify="right")
    table.add_column("s", justify="right")
    table.add_column("rows/s", justify="right")
    for t in report.tables.values():
        table.add_row(
            t.table,
            f"{t.source_rows if t.legacy_rows is None else t.legacy_rows:,}",
            f"{t.moved:,}",
            f"{t.already_present:,}",
            f"[red]{t.quarantined:,}[/]" if t.quarantined else "0",
            f"{t.seconds:.1f}",
            _rate(t.moved, t.seconds),
        )
    err_console.print(table)
    err_console.print(f"source: {report.source_kind}; target: {report.mode}")
    if report.embedding is not None:
        err_console.print(
            f"embedding model: {report.embedding.model} ({report.embedding.dimension} dims)"
        )
    if report.conversions:
        parts = ", ".join(f"{k} {n}" for k, n in sorted(report.conversions.items()))
        err_console.print(f"conversions: {parts}")
    if report.message_counts_fixed:
        err_console.print(f"message_count recomputed for {report.message_counts_fixed} sessions")
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if report.backup_path is not None:
        err_console.print(f"backup of the source: {report.backup_path}")
    if report.quarantined:
        where = report.quarantine_path or "(dry run: not written)"
        err_console.print(f"[yellow]{report.quarantined} rows quarantined:[/] {where}")
        if report.dry_run:
            for entry in report.quarantine_samples[:10]:
                err_console.print(
                    f"  {entry['table']} {entry['key']!r}: {entry['reason']}", soft_wrap=True
                )
    if report.verify is not None:
        _print_verify(report.verify, brief=report.verify.identical)
    err_console.print(f"total time: {report.seconds:.1f} s")


def _print_verify(report: VerifyReport, *, brief: bool = False) -> None:
    if brief:
        rows = sum(t.matching for t in report.tables.values())
        vectors = sum(t.vectors_compared for t in report.tables.values())
        err_console.print(
            f"[green]verified:[/] {rows:,} rows identical ({vectors:,} embeddings compared"
            f" bit for bit) in {report.seconds:.1f} s"
        )
        return
    table = Table(title=f"verify: {report.source} -> {report.target}")
    for name in ("table", "expected", "target", "same", "missing", "extra", "differ"):
        table.add_column(name, justify="left" if name == "table" else "right")
    table.add_column("invalid", justify="right")
    table.add_column("quar.", justify="right")
    table.add_column("vectors", justify="right")
    table.add_column("")
    for t in report.tables.values():
        table.add_row(
            t.table,
            f"{t.expected_rows:,}",
            f"{t.target_rows:,}",
            f"{t.matching:,}",
            str(t.missing_count),
            str(t.extra_count),
            str(t.differing_count),
            str(t.invalid_count),
            str(t.source_quarantined),
            f"{t.vectors_compared:,}",
            "[green]ok[/]" if t.identical else "[red]DIFFERS[/]",
        )
    err_console.print(table)
    for t in report.tables.values():
        if t.missing:
            more = f" (first {len(t.missing)})" if t.missing_count > len(t.missing) else ""
            err_console.print(f"{t.table}: missing in target{more}: {t.missing}", soft_wrap=True)
        if t.extra:
            more = f" (first {len(t.extra)})" if t.extra_count > len(t.extra) else ""
            err_console.print(f"{t.table}: only in target{more}: {t.extra}", soft_wrap=True)
        for d in t.differing:
            err_console.print(
                f"{t.table}: {d['key']!r} differs in {', '.join(d['columns'])}", soft_wrap=True
            )
        for d in t.invalid:
            err_console.print(
                f"{t.table}: target row {d['key']!r} is invalid: {d['reason']}", soft_wrap=True
            )
    for check, n in report.integrity.items():
        if n:
            err_console.print(f"[red]integrity:[/] {n} {check}")
    if report.marker is not None:
        err_console.print(
            "[red]the target is marked as an unfinished migration[/]"
            f" ({report.marker.get('source', '?')})"
        )
    verdict = "[green]identical[/]" if report.identical else "[red]NOT identical[/]"
    err_console.print(f"{verdict} ({report.seconds:.1f} s)")


@app.command("migrate")
@run_async
async def migrate_command(
    source: SourceOption,
    target: TargetOption,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Report what would move and be rejected; write nothing."),
    ] = False,
    source_timezone: TimezoneOption = None,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart", help="Wipe an unfinished migration in the target and start over."
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Rows per batch (one transaction each).")
    ] = DEFAULT_BATCH,
    quarantine: Annotated[
        Path | None,
        typer.Option(
            "--quarantine",
            help="Rejected rows (JSON lines); default BACKUP_DIR/kotonoha-quarantine-*.jsonl.",
            show_default=False,
        ),
    ] = None,
    backup_dir: Annotated[
        Path | None,
        typer.Option(
            "--backup-dir",
            help="Where the source backup goes; default BACKUP_DIR.",
            show_default=False,
        ),
    ] = None,
    max_diffs: MaxDiffsOption = DEFAULT_MAX_DIFFS,
    as_json: JsonOption = False,
) -> None:
    """Copy a whole database into an empty one (SQLite <-> PostgreSQL), then verify it.

    A SQLite source is checked (PRAGMA integrity_check) and backed up first (online
    backup, path printed); a legacy database (the old one-table bot) is converted.
    Rows that cannot move faithfully go to a quarantine file (JSON lines: table, key,
    reason). An interrupted migration resumes when rerun with the same arguments.

    Exit codes: 0 = migrated and verified, nothing quarantined; 3 = migrated and
    verified, some rows quarantined (see the file); 1 = failed or the target differs
    (the message says what state the target is in); 2 = bad usage or settings.

    Example: kotonoha db migrate -s sqlite:///data/kotonoha.db -t postgresql://kotonoha@db/kotonoha
    """
    settings = get_settings()
    with _bars(not as_json) as bars:
        try:
            report = await migrate(
                source,
                target,
                settings=settings,
                dry_run=dry_run,
                restart=restart,
                source_timezone=source_timezone,
                batch_size=batch_size,
                backup_dir=backup_dir,
                quarantine_path=quarantine,
                progress=_Bars(bars),
                max_diffs=max_diffs,
            )
        except VerificationFailedError as exc:
            bars.stop()
            if as_json:
                print_json(exc.report.as_dict())
            else:
                _print_migration(exc.report)
                if exc.report.verify is not None:
                    _print_verify(exc.report.verify)
            raise fail(str(exc), 1) from None
    if as_json:
        print_json(report.as_dict())
    else:
        _print_migration(report)
    if dry_run and report.mode == "refuse":
        raise typer.Exit(1)
    if report.quarantined:
        raise typer.Exit(EXIT_QUARANTINED)


@app.command("verify")
@run_async
async def verify_command(
    source: SourceOption,
    target: TargetOption,
    source_timezone: TimezoneOption = None,
    max_diffs: MaxDiffsOption = DEFAULT_MAX_DIFFS,
    as_json: JsonOption = False,
) -> None:
    """Compare a migrated database with its source, row by row; exit 0 only when identical.

    Checks exact row counts per table, a checksum of every row in key order, every
    embedding bit for bit, and that no row points nowhere. Rows the migration would
    quarantine are expected to be missing. Exit codes: 0 = identical, 1 = differences
    (the first --max-diffs keys per table are listed) or an error, 2 = bad usage.

    Example: kotonoha db verify -s sqlite:///data/kotonoha.db -t postgresql://kotonoha@db/kotonoha
    """
    settings = get_settings()
    with _bars(not as_json) as bars:
        report = await verify(
            source,
            target,
            settings=settings,
            source_timezone=source_timezone,
            max_diffs=max_diffs,
            progress=_Bars(bars),
        )
    if as_json:
        print_json(report.as_dict())
    else:
        _print_verify(report)
    if not report.identical:
        raise typer.Exit(1)


@app.command("upgrade")
@run_async
async def upgrade_command(
    database: DatabaseOption = None,
    source_timezone: TimezoneOption = None,
    backup_dir: Annotated[
        Path | None,
        typer.Option(
            "--backup-dir", help="Where the backup goes; default BACKUP_DIR.", show_default=False
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Upgrade a legacy SQLite database (the old one-table bot) to the current schema in place.

    A backup is taken first (path printed); the conversion is one transaction, so a
    failure leaves the file as it was. Legacy sessions have no guild id and are never
    archived into a guild's knowledge. Exit codes: 0 = upgraded (or already current),
    3 = upgraded with quarantined rows (see the file), 1 = failed, 2 = bad usage.

    Example: kotonoha db upgrade --database sqlite:///data/kotonoha.db --source-timezone Asia/Tokyo
    """
    settings = get_settings()
    url = database_url(settings, database)
    with _bars(not as_json) as bars:
        report = await upgrade(
            url,
            settings=settings,
            source_timezone=source_timezone,
            backup_dir=backup_dir,
            progress=_Bars(bars),
        )
    if as_json:
        print_json(report.as_dict())
    elif report.already_current:
        err_console.print(f"{report.path} already has the current schema; nothing to do")
    else:
        legacy = report.legacy
        err_console.print(
            f"upgraded {report.path}: {legacy['sessions']} sessions, {legacy['messages']}"
            f" messages (times without offset read as {report.timezone})"
        )
        err_console.print(f"backup of the legacy file: {report.backup_path}")
        if report.conversions:
            parts = ", ".join(f"{k} {n}" for k, n in sorted(report.conversions.items()))
            err_console.print(f"conversions: {parts}")
        for warning in report.warnings:
            err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
        if report.quarantined:
            err_console.print(
                f"[yellow]{report.quarantined} rows quarantined:[/] {report.quarantine_path}"
            )
        if report.verify is not None:
            _print_verify(report.verify, brief=True)
    if report.quarantined:
        raise typer.Exit(EXIT_QUARANTINED)


# --- backups ---------------------------------------------------------------------------


@app.command("backup")
@run_async
async def backup_command(
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="A directory (ending in /, or existing; rotated) or a new file name (not"
            " rotated); default BACKUP_DIR.",
            show_default=False,
        ),
    ] = None,
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Back up the database (online, while the bot runs) and keep the newest BACKUP_KEEP.

    SQLite: SQLite's online backup API, then an integrity check of the copy.
    PostgreSQL: pg_dump -Fc (with a checksum manifest) when a pg_dump of the server's
    major version or newer is on PATH, otherwise a verified logical export into a
    SQLite file. Restore with `kotonoha db restore PATH`.

    Example: kotonoha db backup --output /mnt/usb/kotonoha/
    """
    from kotonoha_bot.transfer.backup import backup_database, describe

    settings = get_settings()
    url = database_url(settings, database)
    with _bars(not as_json) as bars:
        result = await backup_database(settings, url, output=output, progress=_Bars(bars))
    if as_json:
        print_json(describe(result))
        return
    if result.note:
        err_console.print(f"[yellow]note:[/] {result.note}", soft_wrap=True)
    err_console.print(
        f"backup written ({result.method}, {human_size(result.size_bytes)},"
        f" {result.seconds:.1f} s):"
    )
    out_console.print(str(result.path.resolve()), soft_wrap=True)
    if result.manifest is not None:
        err_console.print(f"manifest: {result.manifest}", soft_wrap=True)
    for old in result.rotated:
        err_console.print(f"rotated out: {old}", soft_wrap=True)


@app.command("restore")
@run_async
async def restore_command(
    path: Annotated[Path, typer.Argument(help="A backup: a SQLite .db file or a pg_dump .dump.")],
    database: DatabaseOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    wipe: Annotated[
        bool,
        typer.Option("--wipe", help="Delete the target's rows first (otherwise it must be empty)."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Restore a backup into the database (which must be empty, or --wipe), then verify it.

    A SQLite backup (from either backend) is copied row by row with the migration code
    and verified against the file, so it restores into SQLite or PostgreSQL. A pg_dump
    archive is restored with pg_restore (PostgreSQL only) and checked against its
    manifest. Stop the bot first. Exit codes: 0 = restored and verified, 1 = failed,
    refused or not confirmed, 2 = bad usage.

    Example: kotonoha db restore backups/kotonoha-20270101-030000-000000.db --yes
    """
    from kotonoha_bot.transfer.backup import backup_kind, restore_backup, target_is_empty
    from kotonoha_bot.transfer.endpoints import display_url

    settings = get_settings()
    url = database_url(settings, database)
    if not path.is_file():
        raise fail(f"{path} does not exist", 1)
    kind = backup_kind(path)
    empty = await target_is_empty(url, settings)
    if not empty and not wipe:
        raise fail(
            f"{display_url(url)} is not empty; restore into an empty database, or add --wipe"
            " to delete its rows first",
            1,
        )
    if not yes:
        warning = (
            "ALL ITS CURRENT ROWS WILL BE DELETED first (after a safety copy into"
            f" {settings.backup_dir}). "
            if not empty
            else ""
        )
        question = (
            f"Restore {path} ({kind}) into {display_url(url)}? {warning}Stop the bot before"
            " restoring. Continue?"
        )
        try:
            confirmed = typer.confirm(question, default=False, err=True)
        except typer.Abort:  # no answer (stdin closed) is a no
            confirmed = False
        if not confirmed:
            raise fail("not confirmed; nothing was changed", 1)
    with _bars(not as_json) as bars:
        result = await restore_backup(path, settings, url, wipe_first=wipe, progress=_Bars(bars))
    if as_json:
        print_json(
            {
                "path": str(result.path),
                "target": result.target,
                "method": result.method,
                "verified": result.verified,
                "wiped": result.wiped,
                "safety_copy": str(result.safety_copy) if result.safety_copy else None,
                "seconds": round(result.seconds, 3),
            }
        )
        return
    err_console.print(
        f"restored {result.path} into {result.target} ({result.method},"
        f" {result.seconds:.1f} s); verified: {result.verified}",
        soft_wrap=True,
    )
    if result.safety_copy is not None:
        err_console.print(
            f"the rows it replaced are kept in {result.safety_copy}; to go back:"
            f" kotonoha db restore {result.safety_copy} --wipe --yes",
            soft_wrap=True,
        )
