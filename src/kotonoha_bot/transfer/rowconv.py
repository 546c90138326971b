"""The tables the transfer tool moves, and the rules that turn a stored row into a clean one.

Both directions of ``kotonoha db migrate`` and ``kotonoha db verify`` read rows from a
backend as raw driver values (SQLite: ``RawText`` for TEXT, ``bytes`` for BLOB, ints,
floats; PostgreSQL: str, int, aware datetimes, little-endian float32 ``bytes`` for
vectors) and pass every row through :class:`RowConverter`. The converter returns the
*canonical row* (a tuple in :attr:`TableSpec.columns` order holding ``str | int |
None | datetime | bytes``; JSON as compact sorted text; vectors as ``<f4`` bytes) or
raises :class:`Reject` with a reason. A rejected row goes to the quarantine file; it is
never written and never dropped silently.

Documented conversions (each counted in :attr:`RowConverter.stats`):

==================  ============================================================
``nul_replaced``    U+0000 in text (also inside JSON) -> U+FFFD (the NUL rule)
``int_from_text``   an integer stored as text ("123") -> 123
``int_from_real``   an integral REAL (123.0) -> 123
``text_from_blob``  text stored as a BLOB that is valid UTF-8 -> text
``text_from_number``a number stored in a text column -> its decimal text
``naive_time``      a time without offset -> read in ``--source-timezone``
``search_text``     a missing chunk keyword document -> rebuilt from the content
``day_from_time``   a usage day stored as a full timestamp -> its UTC date
==================  ============================================================

Everything else that the target could not store or that breaks an invariant is
rejected: invalid UTF-8, malformed or non-object JSON, NULL in a required column,
unknown roles/types/statuses, out-of-range integers, vectors that are NaN/Inf/zero or
of the wrong dimension, children whose parent was rejected (a message's reply links,
a chunk's provenance rows, re-embed vectors), and chunks whose guild differs from
their source's (that would leak one server's memory into another).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal
from typing import Any

import numpy as np

from kotonoha_bot.db.tables import (
    CHUNK_MESSAGES,
    CHUNKS,
    COUNT,
    DAY,
    INT32,
    JSON_OBJ,
    MESSAGE_REFS,
    MESSAGES,
    REEMBED,
    ROW_ID,
    SESSIONS,
    SNOWFLAKE,
    SNOWFLAKE_OPT,
    SOURCES,
    TEXT,
    TEXT_OPT,
    TIME,
    VECTOR,
    VECTOR_OPT,
    RawText,
    Row,
    TableSpec,
    canonical_json,
)
from kotonoha_bot.models import (
    ROLES,
    SESSION_STATUSES,
    SESSION_TYPES,
    SOURCE_STATUSES,
    SOURCE_TYPES,
)
from kotonoha_bot.text import NUL, REPLACEMENT, keyword_document

_INT32 = (-(2**31), 2**31 - 1)
_INT64_ID = (0, 2**63 - 1)
_INT_TEXT_RE = re.compile(r"^\s*[+-]?[0-9]+\s*$")  # ASCII digits only
_DAY_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


class Reject(Exception):
    """This row cannot be moved faithfully; ``str(self)`` is the reason."""


_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sessions", "session_type"): SESSION_TYPES,
    ("sessions", "status"): SESSION_STATUSES,
    ("messages", "role"): ROLES,
    ("knowledge_sources", "source_type"): SOURCE_TYPES,
    ("knowledge_sources", "status"): SOURCE_STATUSES,
}
_NON_EMPTY = {
    ("sessions", "session_key"),
    ("knowledge_sources", "uri"),
    ("kotonoha_meta", "key"),
    ("memories", "content"),
    ("llm_usage", "model"),
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class RowConverter:
    """Turns raw stored rows into canonical rows, or rejects them with a reason.

    It carries what cross-row rules need: the sessions and sources accepted so far (a
    message or chunk whose parent was rejected is rejected too), and the vector sizes.
    ``stats`` counts each documented conversion.
    """

    def __init__(
        self,
        *,
        timezone: tzinfo,
        embedding_dim: int | None = None,
        reembed_dim: int | None = None,
    ) -> None:
        self.timezone = timezone
        self.embedding_dim = embedding_dim
        self.reembed_dim = reembed_dim
        self.stats: Counter[str] = Counter()
        # Conversions of the row being converted; counted only if the row is accepted.
        self.pending: Counter[str] = Counter()
        self.good_sessions: set[str] = set()
        self.source_guilds: dict[int, int] = {}
        #: Decide whether a child row's chunk / message was moved (set by the caller).
        self.chunk_exists: Callable[[int], bool] = lambda _cid: False
        self.message_exists: Callable[[int], bool] = lambda _mid: False
        #: Messages accepted per session (the target's message_count).
        self.message_counts: Counter[str] = Counter()
        self._plans: dict[str, list[tuple[str, str, bool, Callable[[Any], Any]]]] = {}

    # --- values -------------------------------------------------------------------

    def text(self, value: Any, column: str) -> str:
        if type(value) is str and value.isascii() and NUL not in value:
            return value  # the common case, checked cheaply
        if isinstance(value, RawText):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Reject(f"{column}: invalid UTF-8 at byte {exc.start}") from None
        elif isinstance(value, str):
            text = value
        elif isinstance(value, bytes | bytearray | memoryview):
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Reject(
                    f"{column}: text stored as a BLOB that is not UTF-8 (byte {exc.start})"
                ) from None
            self.pending["text_from_blob"] += 1
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise Reject(f"{column}: {value!r} is not text")
            text = str(value)
            self.pending["text_from_number"] += 1
        else:
            raise Reject(f"{column}: {type(value).__name__} is not text")
        if NUL in text:
            self.pending["nul_replaced"] += text.count(NUL)
            text = text.replace(NUL, REPLACEMENT)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Reject(f"{column}: lone surrogate at offset {exc.start}") from None
        return text

    def integer(self, value: Any, column: str, bounds: tuple[int, int]) -> int:
        if type(value) is int and bounds[0] <= value <= bounds[1]:
            return value  # the common case
        if isinstance(value, bool):
            raise Reject(f"{column}: boolean is not an integer")
        if isinstance(value, int):
            number = value
        elif isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise Reject(f"{column}: {value!r} is not an integer")
            number = int(value)
            self.pending["int_from_real"] += 1
        elif isinstance(value, str | bytes):
            raw = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if not _INT_TEXT_RE.match(raw):
                raise Reject(f"{column}: {raw[:40]!r} is not an integer")
            number = int(raw)
            self.pending["int_from_text"] += 1
        else:
            raise Reject(f"{column}: {type(value).__name__} is not an integer")
        low, high = bounds
        if not low <= number <= high:
            raise Reject(f"{column}: {number} is out of range ({low}..{high})")
        return number

    def time(self, value: Any, column: str) -> datetime:
        if isinstance(value, datetime):
            parsed = value
        else:
            text = self.text(value, column)
            try:
                parsed = datetime.fromisoformat(text.strip())
            except ValueError:
                raise Reject(f"{column}: {text[:40]!r} is not an ISO 8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=self.timezone)
            self.pending["naive_time"] += 1
        return parsed.astimezone(UTC)

    def day(self, value: Any, column: str) -> date:
        if isinstance(value, datetime):
            self.pending["day_from_time"] += 1
            return value.astimezone(UTC).date()
        if isinstance(value, date):
            return value
        text = self.text(value, column).strip()
        if not _DAY_RE.match(text):
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise Reject(f"{column}: {text[:40]!r} is not a YYYY-MM-DD day") from None
            self.pending["day_from_time"] += 1
            aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=self.timezone)
            return aware.astimezone(UTC).date()
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise Reject(f"{column}: {text!r} is not a calendar day") from None

    def json_object(self, value: Any, column: str) -> str:
        text = self.text(value, column)
        try:
            parsed = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise Reject(f"{column}: malformed JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise Reject(f"{column}: JSON {type(parsed).__name__} where an object is required")
        parsed = self._json_nul(parsed)
        out = canonical_json(parsed)
        try:
            out.encode("utf-8")
        except UnicodeEncodeError:
            raise Reject(f"{column}: JSON holds a lone surrogate") from None
        return out

    def _json_nul(self, value: Any) -> Any:
        if isinstance(value, str):
            if NUL in value:
                self.pending["nul_replaced"] += value.count(NUL)
                return value.replace(NUL, REPLACEMENT)
            return value
        if isinstance(value, list):
            return [self._json_nul(v) for v in value]
        if isinstance(value, dict):
            return {self._json_nul(k): self._json_nul(v) for k, v in value.items()}
        return value

    def vector(self, value: Any, column: str, dim: int | None) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise Reject(f"{column}: {type(value).__name__} is not a float32 vector")
        blob = bytes(value)
        if len(blob) % 4 or not blob:
            raise Reject(f"{column}: {len(blob)} bytes is not a float32 vector")
        if dim is None:
            raise Reject(f"{column}: a vector but no embedding model is recorded for it")
        if len(blob) != dim * 4:
            raise Reject(f"{column}: {len(blob) // 4} dimensions, the database records {dim}")
        arr = np.frombuffer(blob, dtype="<f4")
        if not np.isfinite(arr).all():
            raise Reject(f"{column}: vector contains NaN or infinity")
        if not arr.any():
            raise Reject(f"{column}: vector is all zeros")
        return blob

    # --- rows ---------------------------------------------------------------------

    def convert(self, spec: TableSpec, raw: Sequence[Any]) -> Row:
        """The canonical row for ``raw`` (values in ``spec.columns`` order), or Reject."""
        self.pending.clear()
        try:
            row = self._convert(spec, raw)
        except Reject:
            self.pending.clear()
            raise
        self.commit_row()
        return row

    def commit_row(self) -> None:
        """Count the conversions of an accepted row."""
        if self.pending:
            self.stats.update(self.pending)
            self.pending.clear()

    def _plan(self, spec: TableSpec) -> list[tuple[str, str, bool, Callable[[Any], Any]]]:
        """Per column: name, kind, nullable, and the function that converts a value."""
        plan = []
        for column, kind in spec.columns:
            nullable = kind in (TEXT_OPT, SNOWFLAKE_OPT, VECTOR_OPT)
            fn: Callable[[Any], Any]
            if kind in (TEXT, TEXT_OPT):
                fn = self._text_rule(
                    column, _ENUMS.get((spec.name, column)), (spec.name, column) in _NON_EMPTY
                )
            elif kind == ROW_ID:
                fn = functools.partial(self.integer, column=column, bounds=(1, _INT64_ID[1]))
            elif kind in (SNOWFLAKE, SNOWFLAKE_OPT):
                fn = functools.partial(self.integer, column=column, bounds=_INT64_ID)
            elif kind == INT32:
                fn = functools.partial(self.integer, column=column, bounds=_INT32)
            elif kind == COUNT:
                fn = functools.partial(self.integer, column=column, bounds=_INT64_ID)
            elif kind == TIME:
                fn = functools.partial(self.time, column=column)
            elif kind == DAY:
                fn = functools.partial(self.day, column=column)
            elif kind == JSON_OBJ:
                fn = functools.partial(self.json_object, column=column)
            elif kind in (VECTOR, VECTOR_OPT):
                fn = self._vector_rule(column, spec is REEMBED)
            else:  # pragma: no cover - the specs above use only these kinds
                raise AssertionError(kind)
            plan.append((column, kind, nullable, fn))
        return plan

    def _text_rule(
        self, column: str, allowed: tuple[str, ...] | None, non_empty: bool
    ) -> Callable[[Any], str]:
        def rule(value: Any) -> str:
            text = self.text(value, column)
            if allowed is not None and text not in allowed:
                raise Reject(f"{column}: unknown value {text[:40]!r}")
            if non_empty and not text:
                raise Reject(f"{column}: empty")
            return text

        return rule

    def _vector_rule(self, column: str, reembed: bool) -> Callable[[Any], bytes]:
        def rule(value: Any) -> bytes:
            dim = self.reembed_dim if reembed else self.embedding_dim
            return self.vector(value, column, dim)

        return rule

    def _convert(self, spec: TableSpec, raw: Sequence[Any]) -> Row:
        plan = self._plans.get(spec.name)
        if plan is None:
            plan = self._plans[spec.name] = self._plan(spec)
        if len(raw) != len(plan):
            raise Reject(f"{len(raw)} values where {len(plan)} columns are expected")
        out: list[Any] = []
        for (column, _kind, nullable, fn), value in zip(plan, raw, strict=True):
            if value is None:
                if not nullable:
                    raise Reject(f"{column}: NULL in a required column")
                out.append(None)
            else:
                out.append(fn(value))
        return self._cross_check(spec, out)

    def _cross_check(self, spec: TableSpec, row: list[Any]) -> Row:
        if spec is SESSIONS:
            self.good_sessions.add(row[0])
        elif spec is MESSAGES:
            if row[1] not in self.good_sessions:
                raise Reject(f"session {row[1]!r} was not moved (missing or quarantined)")
            self.message_counts[row[1]] += 1
        elif spec is SOURCES:
            self.source_guilds[row[0]] = row[1]
        elif spec is CHUNKS:
            guild = self.source_guilds.get(row[1])
            if guild is None:
                raise Reject(f"source {row[1]} was not moved (missing or quarantined)")
            if row[2] != guild:
                raise Reject(
                    f"guild_id {row[2]} differs from its source's {guild}"
                    " (moving it would leak knowledge across guilds)"
                )
            if row[7] is None:
                row[7] = keyword_document(row[6])
                self.pending["search_text"] += 1
        elif spec is REEMBED and not self.chunk_exists(row[0]):
            raise Reject(f"chunk {row[0]} was not moved (missing or quarantined)")
        elif spec is MESSAGE_REFS and not self.message_exists(row[1]):
            raise Reject(f"message {row[1]} was not moved (missing or quarantined)")
        elif spec is CHUNK_MESSAGES:
            if not self.chunk_exists(row[1]):
                raise Reject(f"chunk {row[1]} was not moved (missing or quarantined)")
            if not self.message_exists(row[2]):
                raise Reject(f"message {row[2]} was not moved (missing or quarantined)")
        return tuple(row)

    def forget_message(self, session_key: str) -> None:
        """A message accepted here was then refused by the target: uncount it."""
        self.message_counts[session_key] -= 1


# --- checksums -----------------------------------------------------------------------


def _canonical_value(value: Any) -> str:
    # Numbers are compared by value as decimals: PostgreSQL's jsonb keeps the decimal
    # as written and prints it in full (1e20 -> 100000000000000000000, -0 -> 0).
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Decimal):
        return "0" if value.is_zero() else str(value.normalize())
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_canonical_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return (
            "{"
            + ",".join(
                json.dumps(k, ensure_ascii=False) + ":" + _canonical_value(v) for k, v in items
            )
            + "}"
        )
    raise TypeError(type(value).__name__)  # pragma: no cover - json.loads gives only these


def json_for_compare(text: str) -> str:
    """JSON text in the form verify compares (sorted keys, numbers by decimal value)."""
    return _canonical_value(json.loads(text, parse_float=Decimal, parse_int=Decimal))


def comparable(spec: TableSpec, row: Row) -> tuple[Any, ...]:
    """A row's values as compared by verify (JSON by value, times as UTC ISO text)."""
    out: list[Any] = []
    for (_, kind), value in zip(spec.columns, row, strict=True):
        if value is None:
            out.append(None)
        elif kind == JSON_OBJ:
            out.append(json_for_compare(value))
        elif kind == TIME:
            out.append(value.astimezone(UTC).isoformat(timespec="microseconds"))
        elif kind == DAY:
            out.append(value.isoformat())
        else:
            out.append(value)
    return tuple(out)


def row_digest(values: Iterable[Any]) -> bytes:
    """A 16-byte checksum of a comparable row (type-tagged, length-prefixed)."""
    parts: list[bytes] = []
    for value in values:
        if value is None:
            parts.append(b"N")
        elif isinstance(value, int):
            parts.append(b"I%d;" % value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
            parts.append(b"S%d:" % len(data))
            parts.append(data)
        elif isinstance(value, bytes):
            parts.append(b"B%d:" % len(value))
            parts.append(value)
        else:  # pragma: no cover - comparable() produces only these
            raise TypeError(type(value).__name__)
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def jsonable(value: Any) -> Any:
    """A raw stored value as JSON for the quarantine file (bytes as hex, times as ISO)."""
    if isinstance(value, RawText):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"invalid_utf8_hex": value.hex()}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"blob_hex": bytes(value).hex()}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value
