"""The quarantine file: rows the transfer could not move, with their table, key and reason.

A rejected row is never written and never dropped silently: it goes here as one JSON
line, in a file readable by its owner only (it holds a community's conversations).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kotonoha_bot.db.tables import TableSpec
from kotonoha_bot.transfer.rowconv import jsonable


class Quarantine:
    """Rows that could not be moved: JSON lines ``{table, key, reason, row}``.

    The file is created on the first row only; ``path=None`` keeps samples in memory
    (dry runs).
    """

    def __init__(self, path: Path | None, *, samples: int = 20) -> None:
        self.path = path
        self.count = 0
        self.by_table: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self._max_samples = samples
        self._file: Any = None

    def add(self, table: str, key: Any, reason: str, row: dict[str, Any]) -> None:
        self.count += 1
        self.by_table[table] += 1
        entry = {"table": table, "key": jsonable(key), "reason": reason, "row": row}
        if len(self.samples) < self._max_samples:
            self.samples.append(entry)
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Quarantined rows are conversations: readable by their owner only.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        try:
            line = json.dumps(entry, ensure_ascii=False, default=str)
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(entry, ensure_ascii=True, default=str)
        self._file.write(line + "\n")
        self._file.flush()

    def add_row(self, spec: TableSpec, raw: Sequence[Any], reason: str) -> None:
        self.add(
            spec.name,
            raw[spec.key_index],
            reason,
            {n: jsonable(v) for n, v in zip(spec.names, raw, strict=True)},
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
