"""How the SQLite backend stores times: fixed-width UTC ISO text (sorts as text)."""

from __future__ import annotations

from datetime import UTC, datetime


def ts(value: datetime) -> str:
    """Fixed-width UTC ISO text, so stored times sort and compare as strings."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def dt(value: str) -> datetime:
    """A stored time back as an aware UTC datetime."""
    return datetime.fromisoformat(value).astimezone(UTC)
