"""Run one operator-level case and read its message; shared by the area tests and the doc."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hostile.cases import Case
from tests.hostile.support import REPO, Run, assert_clean, kotonoha, normalize, sqlite_counts

DOC = REPO / "docs" / "OPERATIONS.md"
START = "<!-- hostile-table:start -->"
END = "<!-- hostile-table:end -->"
_TIMES_RE = re.compile(r"\d+\.\d s\b")
_SIZE_RE = re.compile(r"\d+(?:\.\d+)? (?:bytes|B|KiB|MiB|GiB)\b")
_ROWS_RE = re.compile(r"verified: \d+ rows")


def message_of(case: Case, run: Run, work: Path) -> str:
    """The lines the operator reads (chosen by the case's prefixes), normalised, one cell."""
    picked = [
        line.strip() for line in run.stderr.splitlines() if line.strip().startswith(case.lines)
    ]
    if case.stdout:
        picked += [line.strip() for line in run.stdout.splitlines() if line.strip()]
    text = "<br>".join(picked)
    text = _TIMES_RE.sub("N s", _SIZE_RE.sub("SIZE", text))
    return normalize(text, work)


def run_case(case: Case, work: Path) -> tuple[Run, str]:
    work.mkdir(parents=True, exist_ok=True)
    try:
        try:
            argv, env = case.setup(work)
        except PermissionError as exc:
            pytest.skip(str(exc))
        before = sqlite_counts(work / case.live) if case.live else None
        run = kotonoha(*argv, cwd=work, env=env)
        if case.live is not None:
            assert sqlite_counts(work / case.live) == before, "rows changed"
        if case.check is not None:
            case.check(work)
    finally:
        while case.teardown:
            case.teardown.pop()()
    return run, message_of(case, run, work)


def check_case(case: Case, work: Path) -> str:
    """Run, then check exit code, one clean message, no secret, rows kept, the doc row."""
    run, message = run_case(case, work)
    assert run.code == case.code, run.output
    assert_clean(run)
    assert message, f"no line starting with {case.lines} in:\n{run.stderr}"
    if case.lines == ("error:",):
        assert len(message.split("<br>")) == 1, run.stderr
    documented = documented_messages().get(case.when)
    assert documented is not None, f"docs/OPERATIONS.md has no row for {case.when!r}"
    assert documented == cell(message), (
        f"docs/OPERATIONS.md says\n  {documented}\nbut the run printed\n  {cell(message)}\n"
        "(rewrite the table: python -m tests.hostile.document)"
    )
    return message


def cell(text: str) -> str:
    """A table cell: pipes escaped, code-quoted lines."""
    lines = [f"`{line.replace('`', '')}`" for line in text.split("<br>") if line]
    return "<br>".join(lines).replace("|", "\\|")


def documented_messages() -> dict[str, str]:
    """``when`` -> message cell, from the table in docs/OPERATIONS.md."""
    text = DOC.read_text(encoding="utf-8")
    if START not in text:
        return {}
    body = text.split(START, 1)[1].split(END, 1)[0]
    out: dict[str, str] = {}
    for line in body.splitlines():
        if not line.startswith("| ") or line.startswith(("| what happens", "|---")):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        if len(cells) >= 4:
            out[cells[1].strip().replace("\\|", "|")] = cells[2].strip()
    return out
