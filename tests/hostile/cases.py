"""The operator-level hostile cases: one real `kotonoha` process each, on SQLite files.

Each case builds its files in a fresh work directory, runs one command, and says what
must have been kept. The test modules of each area run their cases and check exit
code, no traceback, no password, row counts before/after and the case's own check;
the messages they see are the "what happens when…" table in docs/OPERATIONS.md
(``python -m tests.hostile.document`` rewrites it; a test compares the two).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.hostile.support import PASSWORD, kotonoha, sqlite_counts

Setup = Callable[[Path], tuple[list[str], dict[str, str]]]
Check = Callable[[Path], None]

LIVE = "kotonoha.db"
MEETING = "# 議事録\n\n次回の会議は三月十日、東京本社で行います。資料の確認をお願いします。\n"


@dataclass(frozen=True)
class Case:
    """One thing an unlucky operator or a hostile user does, and what must hold after it."""

    area: str
    when: str  # the doc's "what happens when…" column
    setup: Setup
    code: int
    kept: str  # the doc's "what was kept" column
    lines: tuple[str, ...] = ("error:",)  # prefixes of the lines that are "the message"
    live: str | None = LIVE  # a database whose rows must be the same before and after
    stdout: bool = False  # the message includes what went to stdout (a path)
    check: Check | None = None
    needs_mount: bool = False
    teardown: list[Callable[[], None]] = field(default_factory=list, compare=False)

    @property
    def slug(self) -> str:
        return hashlib.blake2b(self.when.encode(), digest_size=4).hexdigest()


# --- building blocks ---------------------------------------------------------------------

_TEMPLATE: Path | None = None


def _run_async(coro: object) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


def template() -> Path:
    """A filled kotonoha database (sessions, messages, sources, chunks), made once."""
    global _TEMPLATE
    if _TEMPLATE is None or not _TEMPLATE.exists():
        import tempfile

        from kotonoha_bot.config import Settings
        from tests.transfer.test_transfer import fill

        where = Path(tempfile.mkdtemp(prefix="kotonoha-hostile-")) / "template.db"
        settings = Settings(_env_file=None, database_path=where)  # type: ignore[call-arg]
        _run_async(fill(f"sqlite:///{where}", settings, sessions=6, sources=3, chunks=5))
        conn = sqlite3.connect(where)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.close()
        _TEMPLATE = where
    return _TEMPLATE


def live(work: Path, name: str = LIVE) -> Path:
    dest = work / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template(), dest)
    return dest


def backup_of_live(work: Path, name: str = "backups/good.db") -> Path:
    dest = work / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template(), dest)
    return dest


def corrupt_pages(path: Path) -> None:
    """Overwrite b-tree pages after the first with garbage (the header stays valid)."""
    data = bytearray(path.read_bytes())
    for start in range(4096, len(data) - 4096, 8192):
        data[start : start + 64] = bytes((start * 7 + i * 13) % 256 for i in range(64))
    path.write_bytes(bytes(data))


def foreign_sqlite(path: Path) -> Path:
    """Another program's database (a browser history, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
    conn.execute("CREATE TABLE schema_migrations (version TEXT)")
    conn.executemany("INSERT INTO moz_places (url) VALUES (?)", [("https://example.org",)] * 5)
    conn.commit()
    conn.close()
    return path


def legacy_sqlite(path: Path) -> Path:
    """A database of the legacy one-table bot."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE sessions (session_key TEXT PRIMARY KEY, session_type TEXT, messages TEXT,"
        " created_at TEXT, last_active_at TEXT)"
    )
    conn.execute(
        "INSERT INTO sessions VALUES ('mention:1', 'mention', '[]', '2025-01-01T00:00:00',"
        " '2025-01-01T00:00:00')"
    )
    conn.commit()
    conn.close()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus(work: Path) -> Path:
    d = work / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    (d / "guide.md").write_text("# Guide\n\nThe bot remembers conversations.\n", encoding="utf-8")
    return d


def _unchanged(path: str, before: str) -> Check:
    def check(work: Path) -> None:
        assert digest(work / path) == before, f"{path} was modified"
        assert not (work / f"{path}-wal").exists(), "a -wal file was created beside it"

    return check


def _search(work: Path, query: str, guild: str = "2") -> str:
    run = kotonoha(
        "kb", "search", query, "--guild", guild, "-d", "sqlite:///kb.db", "--json", cwd=work
    )
    assert run.code == 0, run.stderr
    return run.stdout


# --- restore and backup ------------------------------------------------------------------


def _restore_bad(make: Callable[[Path], None]) -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        live(work)
        bad = work / "backups" / "bad.db"
        bad.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(template(), bad)
        make(bad)
        return ["db", "restore", "backups/bad.db", "--wipe", "--yes", "-d", f"sqlite:///{LIVE}"], {}

    return setup


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_backup(path: Path) -> None:
    path.unlink()
    foreign_sqlite(path)


def _not_a_backup(path: Path) -> None:
    path.write_text("these are my notes, not a backup\n" * 100, encoding="utf-8")


def _restore_good(work: Path) -> tuple[list[str], dict[str, str]]:
    live(work)
    good = backup_of_live(work)
    conn = sqlite3.connect(good)  # the backup differs from the live rows
    conn.execute("PRAGMA foreign_keys = ON")  # provenance rows go with their messages
    conn.execute("DELETE FROM messages WHERE seq > 0")
    conn.execute("UPDATE sessions SET message_count = 1")
    conn.commit()
    conn.close()
    return ["db", "restore", "backups/good.db", "--wipe", "--yes", "-d", f"sqlite:///{LIVE}"], {}


def _check_safety_copy(work: Path) -> None:
    copies = sorted((work / "backups").glob("kotonoha-*-prerestore-*.db"))
    assert len(copies) == 1, copies
    assert sqlite_counts(copies[0]) == sqlite_counts(template())
    assert (copies[0].stat().st_mode & 0o777) == 0o600


def _backup_into_dir(work: Path) -> tuple[list[str], dict[str, str]]:
    live(work)
    first = kotonoha("db", "backup", "--output", "snapshots/", "-d", f"sqlite:///{LIVE}", cwd=work)
    assert first.code == 0, first.stderr
    time.sleep(0.01)
    return ["db", "backup", "--output", "snapshots/", "-d", f"sqlite:///{LIVE}"], {}


def _check_two_backups(work: Path) -> None:
    made = sorted((work / "snapshots").iterdir())
    assert len(made) == 2 and all(p.suffix == ".db" for p in made), made
    assert all(sqlite_counts(p) == sqlite_counts(template()) for p in made)


def _backup_onto_a_file(work: Path) -> tuple[list[str], dict[str, str]]:
    live(work)
    (work / "notes.db").write_text("my own file", encoding="utf-8")
    return ["db", "backup", "--output", "notes.db", "-d", f"sqlite:///{LIVE}"], {}


def _rotation_same_stem(work: Path) -> tuple[list[str], dict[str, str]]:
    live(work, f"a/{LIVE}")
    live(work, f"b/{LIVE}")
    for _ in range(2):
        run = kotonoha(
            "db", "backup", "-d", f"sqlite:///b/{LIVE}", cwd=work, env={"BACKUP_KEEP": "2"}
        )
        assert run.code == 0, run.stderr
    return ["db", "backup", "-d", f"sqlite:///a/{LIVE}"], {"BACKUP_KEEP": "1"}


def _check_other_backups_kept(work: Path) -> None:
    files = sorted((work / "backups").glob("kotonoha-*.db"))
    assert len(files) == 3, files  # b's two and a's one


# --- URLs ----------------------------------------------------------------------------------


def _bad_url(url: str, fmt: str = "text", *, option: bool = False) -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        env = {"LOG_FORMAT": fmt, "LOG_LEVEL": "DEBUG"}
        if option:
            return ["db", "status", "--database", url], env
        return ["db", "status"], {**env, "DATABASE_TYPE": "postgres", "DATABASE_URL": url}

    return setup


# --- database files ------------------------------------------------------------------------


def _status_of(path_text: str) -> list[str]:
    return ["db", "status", "-d", f"sqlite:///{path_text}"]


def _foreign_file(work: Path) -> tuple[list[str], dict[str, str]]:
    foreign_sqlite(work / "places.db")
    return _status_of("places.db"), {}


def _legacy_file(work: Path) -> tuple[list[str], dict[str, str]]:
    legacy_sqlite(work / "old.db")
    return ["kb", "ingest", "corpus", "--guild", "1", "-d", "sqlite:///old.db"], {}


def _legacy_setup(work: Path) -> tuple[list[str], dict[str, str]]:
    corpus(work)
    return _legacy_file(work)


def _text_file(work: Path) -> tuple[list[str], dict[str, str]]:
    (work / "notes.db").write_text("shopping list\n", encoding="utf-8")
    return _status_of("notes.db"), {}


def _directory(work: Path) -> tuple[list[str], dict[str, str]]:
    (work / "data.db").mkdir()
    return _status_of("data.db"), {}


def _mount(work: Path, case: Case, size: str = "1M") -> Path:
    disk = work / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        raise PermissionError("cannot mount a tmpfs here")
    case.teardown.append(lambda: subprocess.run(["umount", "-l", str(disk)], check=False))
    return disk


def _with_setup(
    factory: Callable[[Case], Setup], area: str, when: str, code: int, kept: str, **kw: Any
) -> Case:
    """A case whose setup needs the case itself (its mount lives in the case's teardown)."""
    case = Case(area, when, lambda w: ([], {}), code, kept, **kw)
    object.__setattr__(case, "setup", factory(case))
    return case


def _disk_full(case: Case) -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        disk = _mount(work, case, "2M")
        init = kotonoha("db", "init", "-d", "sqlite:///disk/kb.db", cwd=work)
        assert init.code == 0, init.stderr
        with contextlib.suppress(OSError), (disk / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        big = work / "corpus"
        big.mkdir()
        (big / "big.md").write_text(MEETING * 20000, encoding="utf-8")
        return ["kb", "ingest", "corpus", "--guild", "1", "-d", "sqlite:///disk/kb.db"], {}

    return setup


def _read_only(case: Case) -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        disk = _mount(work, case, "8M")
        init = kotonoha("db", "init", "-d", "sqlite:///disk/kb.db", cwd=work)
        assert init.code == 0, init.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        corpus(work)
        return ["kb", "ingest", "corpus", "--guild", "1", "-d", "sqlite:///disk/kb.db"], {}

    return setup


def _locked(case: Case) -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        db = live(work)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
                " c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(60)",
                str(db),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        case.teardown.append(holder.kill)
        corpus(work)
        return (
            ["kb", "ingest", "corpus", "--guild", "1", "-d", f"sqlite:///{LIVE}"],
            {"SQLITE_BUSY_TIMEOUT_MS": "100", "EMBEDDING_PROVIDER": "hashing"},
        )

    return setup


# --- ingest --------------------------------------------------------------------------------


def _ingest(work: Path, *extra: str) -> list[str]:
    return ["kb", "ingest", *extra, "--guild", "2", "-d", "sqlite:///kb.db"]


def _symlink_out(work: Path) -> tuple[list[str], dict[str, str]]:
    d = corpus(work)
    (d / "passwd.txt").symlink_to("/etc/passwd")
    return _ingest(work, "corpus"), {}


def _check_no_passwd(work: Path) -> None:
    assert "root:" not in _search(work, "root")
    assert "remembers" in _search(work, "remembers")


def _encoded(name: str, encoding: str, bom: bytes = b"") -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        d = work / "corpus"
        d.mkdir()
        (d / name).write_bytes(bom + MEETING.encode(encoding))
        return _ingest(work, "corpus"), {}

    return setup


def _check_meeting_found(work: Path) -> None:
    assert "次回の会議" in _search(work, "会議")


def _binary_by_path(work: Path) -> tuple[list[str], dict[str, str]]:
    corpus(work)
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
    (work / "photo.png").write_bytes(png)
    return _ingest(work, "photo.png", "corpus"), {}


def _check_only_guide(work: Path) -> None:
    counts = sqlite_counts(work / "kb.db")
    assert counts["knowledge_sources"] == 1, counts


def _bad_file_name(work: Path) -> tuple[list[str], dict[str, str]]:
    d = corpus(work)
    name = os.fsencode(d) + b"/caf\xe9-\xff.md"
    with open(name, "wb") as f:
        f.write("# 会議\n\n会議の議事録です。\n".encode())
    return _ingest(work, "corpus"), {}


def _check_both_files(work: Path) -> None:
    assert sqlite_counts(work / "kb.db")["knowledge_sources"] == 2
    assert "会議の議事録" in _search(work, "会議")


def _folder_loop(work: Path) -> tuple[list[str], dict[str, str]]:
    d = corpus(work)
    (d / "loop").symlink_to(d.resolve())
    (d / "outside").symlink_to("/etc")
    return _ingest(work, "corpus"), {}


# --- ids -------------------------------------------------------------------------------------


def _ids(*argv: str) -> Setup:
    def setup(work: Path) -> tuple[list[str], dict[str, str]]:
        corpus(work)
        made = kotonoha("kb", "ingest", "corpus", "--guild", "1", "-d", "sqlite:///kb.db", cwd=work)
        assert made.code == 0, made.stderr
        return [*argv, "-d", "sqlite:///kb.db"], {}

    return setup


# --- the table ---------------------------------------------------------------------------------

NOTHING_CHANGED = "the live database, row for row; nothing was wiped or written"


def build() -> list[Case]:
    cases = [
        Case(
            "restore",
            "`db restore BAD --wipe --yes`, BAD a truncated backup",
            _restore_bad(_truncate),
            1,
            NOTHING_CHANGED,
        ),
        Case(
            "restore",
            "`db restore BAD --wipe --yes`, BAD a bit-flipped backup",
            _restore_bad(corrupt_pages),
            1,
            NOTHING_CHANGED,
        ),
        Case(
            "restore",
            "`db restore BAD --wipe --yes`, BAD another program's SQLite file",
            _restore_bad(_foreign_backup),
            1,
            NOTHING_CHANGED,
        ),
        Case(
            "restore",
            "`db restore BAD --wipe --yes`, BAD not a backup at all",
            _restore_bad(_not_a_backup),
            1,
            NOTHING_CHANGED,
        ),
        Case(
            "restore",
            "`db restore GOOD --wipe --yes` over a database with rows",
            _restore_good,
            0,
            "the replaced rows, in a verified `-prerestore-` safety copy (0600) named in the"
            " message; restore it with the command shown",
            lines=("restored", "the rows it replaced"),
            live=None,
            check=_check_safety_copy,
        ),
        Case(
            "restore",
            "`db backup --output DIR/` run twice (DIR not there yet)",
            _backup_into_dir,
            0,
            "both backups, timestamped in DIR/ (rotated there)",
            lines=("backup written",),
            check=_check_two_backups,
            stdout=True,
        ),
        Case(
            "restore",
            "`db backup --output FILE` onto an existing file",
            _backup_onto_a_file,
            1,
            "FILE, untouched",
            check=_unchanged("notes.db", digest_of_text("my own file")),
        ),
        Case(
            "restore",
            "`db backup` of `a/kotonoha.db` with `BACKUP_KEEP=1` while"
            " `b/kotonoha.db` has backups in the same BACKUP_DIR",
            _rotation_same_stem,
            0,
            "b's backups (rotation only touches its own database's)",
            lines=("backup written",),
            check=_check_other_backups_kept,
            stdout=True,
        ),
    ]
    url_cases = [
        (
            "`DATABASE_URL=kotonoha:PW@localhost/kotonoha` (no scheme)",
            "kotonoha:PW@localhost/kotonoha",
            "text",
        ),
        (
            "`DATABASE_URL=postgresql//kotonoha:PW@…` (no colon)",
            "postgresql//kotonoha:PW@localhost/kotonoha",
            "json",
        ),
        (
            "`DATABASE_URL=postgres:/kotonoha:PW@…` (one slash)",
            "postgres:/kotonoha:PW@localhost/kotonoha",
            "text",
        ),
        (
            "`DATABASE_URL` with an unencoded `/` in the password",
            "postgresql://kotonoha:pa/PW@localhost/kotonoha",
            "json",
        ),
        (
            "`DATABASE_URL` with an unencoded `#` in the password",
            "postgresql://kotonoha:pa#PW@localhost/kotonoha",
            "text",
        ),
        (
            "`DATABASE_URL=postgresql://kotonoha:PW@[::1/kotonoha`",
            "postgresql://kotonoha:PW@[::1/kotonoha",
            "json",
        ),
        (
            "`DATABASE_URL=postgresql://kotonoha:PW@localhost:notaport/kotonoha`",
            "postgresql://kotonoha:PW@localhost:notaport/kotonoha",
            "text",
        ),
        (
            "`DATABASE_URL=postgresql://kotonoha:PW/kotonoha` (host forgotten: PW reads as a port)",
            "postgresql://kotonoha:PW/kotonoha",
            "json",
        ),
    ]
    for when, url, fmt in url_cases:
        cases.append(
            Case(
                "urls",
                f"{when}, `LOG_FORMAT={fmt}`",
                _bad_url(url.replace("PW", PASSWORD), fmt),
                2,
                "everything (nothing was opened); the password is in no output or log",
                live=None,
            )
        )
    cases.append(
        Case(
            "urls",
            "`--database mysql://kotonoha:PW@localhost/db`",
            _bad_url(f"mysql://kotonoha:{PASSWORD}@localhost/db", option=True),
            2,
            "everything (nothing was opened)",
            live=None,
        )
    )
    places = Case(
        "files",
        "`db status -d sqlite:///places.db`, another program's database",
        _foreign_file,
        1,
        "the file, byte for byte, in its own journal mode (no -wal)",
        live=None,
        check=_unchanged_foreign,
    )
    cases += [
        places,
        Case(
            "files",
            "`kb ingest` into a legacy kotonoha file",
            _legacy_setup,
            1,
            "the legacy file, unchanged; the message names `db upgrade`",
            live=None,
            check=_legacy_unchanged,
        ),
        Case(
            "files",
            "`db status -d sqlite:///notes.db`, a text file",
            _text_file,
            1,
            "the file, unchanged",
            live=None,
        ),
        Case(
            "files",
            "`db status -d sqlite:///data.db`, a directory",
            _directory,
            1,
            "the directory, unchanged",
            live=None,
        ),
        Case(
            "files",
            "`db status -d sqlite:////dev/null`",
            lambda w: (_status_of("/dev/null"), {}),
            1,
            "everything (nothing was opened)",
            live=None,
        ),
        Case(
            "files",
            "`db status -d sqlite:////proc/self/mem`",
            lambda w: (_status_of("/proc/self/mem"), {}),
            1,
            "everything (nothing was opened)",
            live=None,
        ),
    ]
    cases += [
        _with_setup(
            _disk_full,
            "files",
            "`kb ingest` while the disk holding the database is full",
            1,
            "every committed row; the failed write was rolled back",
            live="disk/kb.db",
            needs_mount=True,
        ),
        _with_setup(
            _read_only,
            "files",
            "`kb ingest` into a database on a read-only mount",
            1,
            "the database, unchanged",
            live="disk/kb.db",
            needs_mount=True,
        ),
        _with_setup(
            _locked,
            "files",
            "`kb ingest` while another process holds the write lock (busy timeout 100 ms)",
            1,
            "the database, unchanged; retry later",
        ),
    ]
    cases += [
        Case(
            "ingest",
            "`ln -s /etc/passwd corpus/passwd.txt; kb ingest corpus --guild 2`",
            _symlink_out,
            0,
            "the other files ingested; /etc/passwd is not searchable",
            lines=("skipped",),
            live=None,
            check=_check_no_passwd,
        ),
        Case(
            "ingest",
            "a Shift_JIS file",
            _encoded("sjis.txt", "cp932"),
            0,
            "the text, decoded; a search for 会議 finds it",
            lines=("note",),
            live=None,
            check=_check_meeting_found,
        ),
        Case(
            "ingest",
            "an EUC-JP file",
            _encoded("eucjp.txt", "euc_jp"),
            0,
            "the text, decoded; a search for 会議 finds it",
            lines=("note",),
            live=None,
            check=_check_meeting_found,
        ),
        Case(
            "ingest",
            "a UTF-16 file with a byte-order mark",
            _encoded("utf16.txt", "utf-16-le", codecs.BOM_UTF16_LE),
            0,
            "the text, decoded; a search for 会議 finds it",
            lines=("note",),
            live=None,
            check=_check_meeting_found,
        ),
        Case(
            "ingest",
            "a binary file given by path (`kb ingest photo.png corpus`)",
            _binary_by_path,
            1,
            "the other files ingested; no chunk from the binary",
            lines=("failed",),
            live=None,
            check=_check_only_guide,
        ),
        Case(
            "ingest",
            "a file name with invalid UTF-8 bytes in the folder",
            _bad_file_name,
            0,
            "that file and every other one ingested",
            lines=("note",),
            live=None,
            check=_check_both_files,
        ),
        Case(
            "ingest",
            "a symlinked folder loop and a symlink to /etc in the folder",
            _folder_loop,
            0,
            "the folder's own files ingested; nothing outside read",
            lines=("skipped",),
            live=None,
        ),
    ]
    cases += [
        Case(
            "ids",
            "`kb search x --guild 9223372036854775808` (2^63)",
            _ids("kb", "search", "x", "--guild", "9223372036854775808"),
            1,
            NOTHING_CHANGED,
            live="kb.db",
        ),
        Case(
            "ids",
            "`kb ingest corpus --guild 9223372036854775808`",
            _ids("kb", "ingest", "corpus", "--guild", "9223372036854775808"),
            1,
            NOTHING_CHANGED,
            live="kb.db",
        ),
        Case(
            "ids",
            "`kb search x --guild -1`",
            _ids("kb", "search", "x", "--guild", "-1"),
            1,
            NOTHING_CHANGED,
            live="kb.db",
        ),
    ]
    return cases


def digest_of_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_FOREIGN_DIGEST: dict[str, str] = {}


def _unchanged_foreign(work: Path) -> None:
    fresh = foreign_sqlite(work / "reference" / "places.db")
    assert digest(work / "places.db") == digest(fresh)
    assert not (work / "places.db-wal").exists()
    with (work / "places.db").open("rb") as f:
        header = f.read(20)
    assert header[18:20] == b"\x01\x01", "the journal mode was switched to WAL"


def _legacy_unchanged(work: Path) -> None:
    fresh = work / "reference.db"
    legacy_sqlite(fresh)
    conn = sqlite3.connect(work / "old.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"sessions"}, tables


CASES = build()
