"""Helpers for hostile-input tests: a clean `kotonoha` process, row counts, output checks."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: A password no output may ever contain (stdout, stderr, text and JSON logs).
PASSWORD = "Hunter2-Secret"
_STAMP_RE = re.compile(r"\d{8}-\d{6}-\d{6}")
_LABEL_RE = re.compile(r"-[0-9a-f]{8}-(?=(?:prerestore-|premigrate-)?YYYY)")


@dataclass
class Run:
    """One finished `kotonoha` process."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def kotonoha(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> Run:
    """`python -m kotonoha_bot ...` with the developer's settings stripped."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(
            ("DATABASE_", "EMBEDDING_", "OPENAI_", "ANTHROPIC_", "LLM_", "LOG_", "SQLITE_")
        )
    }
    base.update(
        PYTHONPATH=str(REPO / "src"), COLUMNS="250", EMBEDDING_PROVIDER="hashing", NO_COLOR="1"
    )
    base.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "kotonoha_bot", *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_clean(run: Run, *secrets: str) -> None:
    """No traceback and no secret anywhere in what the operator saw."""
    assert "Traceback" not in run.output, run.output
    for secret in (PASSWORD, *secrets):
        assert secret not in run.output, run.output


def sqlite_counts(path: Path) -> dict[str, int]:
    """Rows per kotonoha table, read-only (an absent file has none)."""
    if not path.exists():
        return {}
    # immutable: no -shm is needed (the file may sit on a full or read-only disk).
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        wanted = ("sessions", "messages", "knowledge_sources", "knowledge_chunks", "kotonoha_meta")
        # A database's record of its own last backups is upkeep, not data (see
        # rowconv.LOCAL_META_KEYS): the second backup of a file holds the first's record.
        local = " WHERE key NOT LIKE 'last\\_backup\\_%' ESCAPE '\\'"
        return {
            t: int(
                conn.execute(
                    f"SELECT count(*) FROM {t}" + (local if t == "kotonoha_meta" else "")
                ).fetchone()[0]
            )
            for t in wanted
            if t in names
        }
    finally:
        conn.close()


def normalize(text: str, work: Path) -> str:
    """Make a message comparable across runs: work-dir paths relative, stamps generic."""
    for root in {str(work.resolve()), str(work)}:
        text = text.replace(root + "/", "").replace(root, ".")
    text = _STAMP_RE.sub("YYYYmmdd-HHMMSS-ffffff", text)
    text = _LABEL_RE.sub("-HASH-", text)
    return re.sub(r"uid \d+", "uid N", text)
