"""Rewrite the "what happens when…" table of docs/OPERATIONS.md from real runs.

    .venv/bin/python -m tests.hostile.document

Runs every case of ``tests/hostile/cases.py`` (as root, for the mount cases) and
writes area, case, the message the operator saw and what was kept between the
table markers. The area tests compare each row with their own run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.hostile.cases import CASES
from tests.hostile.runner import DOC, END, START, cell, run_case

AREAS = {
    "restore": "restore / backup",
    "urls": "URLs",
    "files": "database files",
    "ingest": "ingest",
    "ids": "ids",
}


def main() -> None:
    rows = [
        "| area | what happens when… | what the operator sees | what was kept |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="kotonoha-doc-") as tmp:
        for case in CASES:
            _, message = run_case(case, Path(tmp) / case.slug)
            when = case.when.replace("|", "\\|")
            rows.append(f"| {AREAS[case.area]} | {when} | {cell(message)} | {case.kept} |")
            print(f"{case.area}: {case.when}\n    {message}")
    text = DOC.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    DOC.write_text(before + START + "\n" + "\n".join(rows) + "\n" + END + after, encoding="utf-8")


if __name__ == "__main__":
    main()
