"""Databases of the legacy bot (before ADR-0007): detect, convert, upgrade in place.

The legacy bot kept one table::

    sessions(session_key TEXT PRIMARY KEY, session_type TEXT, messages TEXT,
             created_at TEXT, last_active_at TEXT,
             channel_id INTEGER, thread_id INTEGER, user_id INTEGER)

``messages`` is a JSON array of ``{"role", "content", "timestamp"}``; times are ISO 8601
without an offset in the host's local time; there is no guild id. Conversion makes
one current ``sessions`` row per legacy row (``status='active'``, ``version=1``,
``guild_id`` NULL: such sessions are never archived into a guild's knowledge) and one
``messages`` row per element, with ids numbered 1.. in session_key order, so converting
the same file twice gives the same rows (a rerun of an interrupted migration resumes).

Rules beyond :mod:`kotonoha_bot.transfer.rowconv`'s (all counted in ``stats``):

- ``session_type`` NULL -> taken from the key prefix (``mention:``, ``thread:``...),
  ``type_from_key``; an unknown type is quarantined.
- ``created_at`` NULL -> the first message's time, ``last_active_at`` NULL -> the last
  (``time_from_messages``); with no message either, the session is quarantined.
- A malformed ``messages`` value quarantines the session (its raw text is kept in the
  quarantine file); one bad element quarantines that message only.
- Message fields other than role/content/timestamp/author_id/author_name/
  discord_message_id are counted in ``ignored_fields`` and reported, not moved.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.sqlite.files import translate
from kotonoha_bot.db.sqlite.rows import connect, create_schema, insert_rows
from kotonoha_bot.db.tables import MESSAGES, SESSIONS, RawText, Row, TableSpec
from kotonoha_bot.errors import DatabaseError
from kotonoha_bot.models import ROLES, SESSION_TYPES
from kotonoha_bot.transfer.reports import TableReport
from kotonoha_bot.transfer.rowconv import Reject, RowConverter, jsonable

if TYPE_CHECKING:
    from kotonoha_bot.transfer.quarantine import Quarantine
    from kotonoha_bot.transfer.reports import MigrationReport, TransferProgress

LEGACY_TABLE = "sessions"
#: The legacy table is renamed to this while an in-place upgrade runs (one transaction).
RENAMED_TABLE = "kotonoha_legacy_sessions"
LEGACY_COLUMNS = (
    "session_key",
    "session_type",
    "messages",
    "created_at",
    "last_active_at",
    "channel_id",
    "thread_id",
    "user_id",
    "guild_id",  # not in the legacy bot, but moved if some fork added it
)
_MESSAGE_FIELDS = {"role", "content", "timestamp", "author_id", "author_name", "discord_message_id"}
_ID_BOUNDS = (0, 2**63 - 1)

Emit = Callable[[TableSpec, list[Row]], None]
QuarantineFn = Callable[[str, Any, str, dict[str, Any]], None]


@dataclass
class LegacyReport:
    """What a conversion read, wrote and set aside."""

    sessions_read: int = 0
    sessions: int = 0
    messages: int = 0
    quarantined_sessions: int = 0
    quarantined_messages: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    ignored_fields: Counter[str] = field(default_factory=Counter)
    ignored_columns: list[str] = field(default_factory=list)


def _decode_json_text(value: Any, conv: RowConverter) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Reject(f"messages: invalid UTF-8 at byte {exc.start}") from None
        if not isinstance(value, RawText):
            conv.pending["text_from_blob"] += 1
        return text
    if isinstance(value, str):
        return value
    raise Reject(f"messages: {type(value).__name__} where a JSON array is required")


class LegacyConverter:
    """Converts legacy rows; one instance per conversion (ids and keys are tracked)."""

    def __init__(self, timezone: tzinfo, quarantine: QuarantineFn) -> None:
        self.conv = RowConverter(timezone=timezone)
        self.quarantine = quarantine
        self.report = LegacyReport(stats=self.conv.stats)
        self.next_id = 1
        self.keys: set[str] = set()

    def session(self, raw: dict[str, Any]) -> tuple[Row, list[Row]] | None:
        """The session row and its message rows, or None when quarantined."""
        self.report.sessions_read += 1
        self.conv.pending.clear()
        try:
            result = self._session(raw)
            self.conv.commit_row()
            return result
        except Reject as exc:
            self.conv.pending.clear()
            self.report.quarantined_sessions += 1
            self.quarantine(
                SESSIONS.name,
                jsonable(raw.get("session_key")),
                str(exc),
                {k: jsonable(v) for k, v in raw.items()},
            )
            return None

    def _session(self, raw: dict[str, Any]) -> tuple[Row, list[Row]]:
        conv = self.conv
        if raw.get("session_key") is None:
            raise Reject("session_key: NULL in a required column")
        key = conv.text(raw["session_key"], "session_key")
        if not key:
            raise Reject("session_key: empty")
        if key in self.keys:
            raise Reject(f"session_key: {key!r} appears twice (after the NUL rule)")
        stype_raw = raw.get("session_type")
        if stype_raw is None:
            stype = key.split(":", 1)[0]
            if stype not in SESSION_TYPES:
                raise Reject("session_type: NULL and the key has no known prefix")
            conv.pending["type_from_key"] += 1
        else:
            stype = conv.text(stype_raw, "session_type")
            if stype not in SESSION_TYPES:
                raise Reject(f"session_type: unknown value {stype[:40]!r}")
        ids = {
            name: None if raw.get(name) is None else conv.integer(raw[name], name, _ID_BOUNDS)
            for name in ("guild_id", "channel_id", "thread_id", "user_id")
        }
        if raw.get("messages") is None:
            raise Reject("messages: NULL in a required column")
        text = _decode_json_text(raw["messages"], conv)
        try:
            items = json.loads(text, strict=False)
        except (ValueError, RecursionError) as exc:
            raise Reject(f"messages: malformed JSON ({exc})") from None
        if not isinstance(items, list):
            raise Reject(f"messages: JSON {type(items).__name__} where an array is required")
        created = (
            None if raw.get("created_at") is None else conv.time(raw["created_at"], "created_at")
        )
        active = (
            None
            if raw.get("last_active_at") is None
            else conv.time(raw["last_active_at"], "last_active_at")
        )
        # Messages are checked before anything is counted, so a rejected session
        # leaves no trace in the counters but its own.
        good: list[tuple[str, str, datetime, int | None, str | None, int | None]] = []
        rejected: list[tuple[int, Any, str]] = []
        for index, item in enumerate(items):
            before = Counter(conv.pending)
            try:
                good.append(self._message(item))
            except Reject as exc:
                conv.pending = before  # a quarantined message's conversions do not count
                rejected.append((index, item, str(exc)))
        if created is None:
            if not good:
                raise Reject("created_at: NULL and no message to take it from")
            created = good[0][2]
            conv.pending["time_from_messages"] += 1
        if active is None:
            active = max([created, *(m[2] for m in good)])
            conv.pending["time_from_messages"] += 1
        for index, item, reason in rejected:
            self.report.quarantined_messages += 1
            self.quarantine(
                MESSAGES.name,
                f"{key}#{index}",
                reason,
                {"session_key": key, "index": index, "message": item},
            )
        self.keys.add(key)
        session: Row = (
            key,
            stype,
            "active",
            ids["guild_id"],
            ids["channel_id"],
            ids["thread_id"],
            ids["user_id"],
            1,
            len(good),
            -1,
            created,
            active,
        )
        messages: list[Row] = []
        # Provenance as migration 3 fills it in: a message is in the session's thread
        # (else its channel); a reply belongs to the turn of the user message before it.
        where = ids["thread_id"] if ids["thread_id"] is not None else ids["channel_id"]
        turn: int | None = None
        for seq, (role, content, ts, author_id, author_name, discord_id) in enumerate(good):
            if role == "user":
                turn = discord_id
            messages.append(
                (
                    self.next_id,
                    key,
                    seq,
                    role,
                    content,
                    author_id,
                    author_name,
                    discord_id,
                    ts,
                    where if discord_id is not None else None,
                    turn if role in ("user", "assistant") else None,
                )
            )
            self.next_id += 1
        self.report.sessions += 1
        self.report.messages += len(messages)
        return session, messages

    def _message(self, item: Any) -> tuple[str, str, datetime, int | None, str | None, int | None]:
        conv = self.conv
        if not isinstance(item, dict):
            raise Reject(f"message is a JSON {type(item).__name__}, not an object")
        for name in ("role", "content", "timestamp"):
            if item.get(name) is None:
                raise Reject(f"{name}: missing")
        role = conv.text(item["role"], "role")
        if role not in ROLES:
            raise Reject(f"role: unknown value {role[:40]!r}")
        if not isinstance(item["content"], str):
            raise Reject(f"content: JSON {type(item['content']).__name__} is not text")
        content = conv.text(item["content"], "content")
        ts = conv.time(item["timestamp"], "timestamp")
        author_id = (
            None
            if item.get("author_id") is None
            else conv.integer(item["author_id"], "author_id", _ID_BOUNDS)
        )
        author_name = (
            None
            if item.get("author_name") is None
            else conv.text(item["author_name"], "author_name")
        )
        discord_id = (
            None
            if item.get("discord_message_id") is None
            else conv.integer(item["discord_message_id"], "discord_message_id", _ID_BOUNDS)
        )
        for extra in item.keys() - _MESSAGE_FIELDS:
            self.report.ignored_fields[str(extra)] += 1
        return role, content, ts, author_id, author_name, discord_id


def convert_legacy(
    conn: sqlite3.Connection,
    *,
    table: str,
    timezone: tzinfo,
    emit: Emit,
    quarantine: QuarantineFn,
    batch: int = 500,
    on_session: Callable[[], None] | None = None,
) -> LegacyReport:
    """Read legacy rows from ``table`` on ``conn`` in key order and emit converted rows."""
    columns = [str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")]
    wanted = [c for c in LEGACY_COLUMNS if c in columns]
    converter = LegacyConverter(timezone, quarantine)
    converter.report.ignored_columns = [c for c in columns if c not in LEGACY_COLUMNS]
    previous = conn.text_factory
    conn.text_factory = RawText
    try:
        cursor = conn.execute(f"SELECT {', '.join(wanted)} FROM {table} ORDER BY session_key")
        sessions: list[Row] = []
        messages: list[Row] = []
        while rows := cursor.fetchmany(batch):
            for values in rows:
                result = converter.session(dict(zip(wanted, values, strict=True)))
                if result is not None:
                    sessions.append(result[0])
                    messages += result[1]
                if on_session is not None:
                    on_session()
            emit(SESSIONS, sessions)
            emit(MESSAGES, messages)
            sessions, messages = [], []
    finally:
        conn.text_factory = previous
    return converter.report


def _emit_into(conn: sqlite3.Connection) -> Emit:
    def emit(spec: TableSpec, rows: list[Row]) -> None:
        if not rows:
            return
        failed = insert_rows(conn, spec, rows)
        if failed:
            # Converted rows are unique and valid by construction.
            raise DatabaseError(f"converting: the new {spec.name} table refused {failed[0][1]}")

    return emit


def legacy_to_file(
    legacy: Path,
    out: Path,
    *,
    timezone: tzinfo,
    quarantine: QuarantineFn,
    on_session: Callable[[], None] | None = None,
) -> LegacyReport:
    """Convert a legacy file into a new current-schema file ``out`` (must not exist)."""
    try:
        src = connect(legacy, readonly=True)
        try:
            dst = sqlite3.connect(out, isolation_level=None)
            try:
                dst.execute("PRAGMA journal_mode = WAL")
                dst.execute("PRAGMA synchronous = NORMAL")
                dst.execute("PRAGMA foreign_keys = ON")
                dst.execute("BEGIN IMMEDIATE")
                create_schema(dst)
                report = convert_legacy(
                    src,
                    table=LEGACY_TABLE,
                    timezone=timezone,
                    emit=_emit_into(dst),
                    quarantine=quarantine,
                    on_session=on_session,
                )
                dst.execute("COMMIT")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise translate(legacy, "converting the legacy database", exc) from None
    return report


def upgrade_in_place(
    path: Path,
    *,
    timezone: tzinfo,
    quarantine: QuarantineFn,
    on_session: Callable[[], None] | None = None,
) -> LegacyReport:
    """Turn a legacy file into the current schema in ONE transaction (all or nothing).

    The legacy table is renamed, the current schema created, the rows converted into
    it, and the legacy table dropped before the commit: a crash or a refused row leaves
    the legacy file exactly as it was.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"ALTER TABLE {LEGACY_TABLE} RENAME TO {RENAMED_TABLE}")
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
                    " AND sql IS NOT NULL",
                    (RENAMED_TABLE,),
                ).fetchall():
                    conn.execute(f'DROP INDEX "{name}"')
                create_schema(conn)
                report = convert_legacy(
                    conn,
                    table=RENAMED_TABLE,
                    timezone=timezone,
                    emit=_emit_into(conn),
                    quarantine=quarantine,
                    on_session=on_session,
                )
                conn.execute(f"DROP TABLE {RENAMED_TABLE}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("VACUUM")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(path, "upgrading the legacy database", exc) from None
    return report


async def convert_legacy_file(
    legacy: Path,
    out: Path,
    timezone: tzinfo,
    quarantine: Quarantine,
    report: MigrationReport | None,
    progress: TransferProgress,
    total: int | None,
) -> Path:
    progress.begin("convert legacy sessions", total)
    result = await asyncio.to_thread(
        legacy_to_file,
        legacy,
        out,
        timezone=timezone,
        quarantine=quarantine.add,
        on_session=lambda: progress.advance("convert legacy sessions", 1),
    )
    progress.end("convert legacy sessions")
    if report is not None:
        report.legacy = legacy_summary(result)
        report.conversions.update(result.stats)
        # Rows set aside while converting count against their tables like any other.
        for spec, read, bad in (
            (SESSIONS, result.sessions_read, result.quarantined_sessions),
            (MESSAGES, result.messages + result.quarantined_messages, result.quarantined_messages),
        ):
            rep = report.tables.setdefault(spec.name, TableReport(spec.name))
            rep.quarantined += bad
            rep.legacy_rows = read
        if result.ignored_fields:
            report.warnings.append(
                "legacy message fields not moved: "
                + ", ".join(f"{k} ({n}x)" for k, n in sorted(result.ignored_fields.items()))
            )
        if result.ignored_columns:
            report.warnings.append("legacy columns not moved: " + ", ".join(result.ignored_columns))
    return out


def legacy_summary(result: LegacyReport) -> dict[str, Any]:
    return {
        "sessions_read": result.sessions_read,
        "sessions": result.sessions,
        "messages": result.messages,
        "quarantined_sessions": result.quarantined_sessions,
        "quarantined_messages": result.quarantined_messages,
    }
