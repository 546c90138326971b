"""Small helpers every transfer step shares: batch sizes, time zones, file names, meta.

Nothing here touches a database; the steps (copy, verify, upgrade, backup) import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kotonoha_bot.errors import ConfigError, KotonohaError, MigrationError
from kotonoha_bot.models import EmbeddingConfig

T = TypeVar("T")

#: Rows per batch (and per transaction) when copying.
DEFAULT_BATCH = 2000


#: Differing keys listed per table by verify.
DEFAULT_MAX_DIFFS = 10


def resolve_timezone(name: str | None) -> tuple[tzinfo, str]:
    """The zone naive legacy times are read in: ``name`` (IANA), else the host's."""
    if name:
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"unknown time zone {name!r}: use an IANA name such as Asia/Tokyo or UTC"
            ) from None
    env = os.environ.get("TZ", "").lstrip(":")
    candidates = [env] if env else []
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    with contextlib.suppress(OSError):
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    for candidate in candidates:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(candidate), candidate
    local = datetime.now().astimezone().tzinfo or UTC
    return local, f"host offset {datetime.now().astimezone().strftime('%z')}"


def timestamped(directory: Path, label: str, suffix: str) -> Path:
    """``directory/label-YYYYmmdd-HHMMSS-ffffff{suffix}`` (names sort by time)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return directory / f"{label}-{stamp}{suffix}"


def embedding_from_meta(meta: dict[str, str], prefix: str) -> EmbeddingConfig | None:
    model = meta.get(f"{prefix}_model")
    dim = meta.get(f"{prefix}_dimension")
    if model is None or dim is None:
        return None
    try:
        return EmbeddingConfig(model, int(dim))
    except ValueError:
        raise MigrationError(
            f"source kotonoha_meta {prefix}_dimension {dim!r} is not a number"
        ) from None


async def prefetch(batches: AsyncIterator[T]) -> AsyncIterator[T]:
    """Fetch the next batch while the caller works on this one (I/O overlaps CPU)."""
    pending: asyncio.Future[T | None] = asyncio.ensure_future(anext(batches, None))
    try:
        while True:
            item = await pending
            if item is None:
                return
            pending = asyncio.ensure_future(anext(batches, None))
            yield item
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, KotonohaError):
                await pending


def key_text(key: Any) -> Any:
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    return key
