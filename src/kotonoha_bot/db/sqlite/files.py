"""SQLite files as the operator has them: what a file is, how it is created, why it failed.

Three rules live here, shared by the backend (``connection.py``) and the transfer
tool's raw access (``rows.py``):

- **Decide before touching.** :func:`classify` reads ``sqlite_master`` of an existing
  file and :func:`check_openable` refuses anything that is neither empty nor
  kotonoha's — another program's database is never given our tables or switched to
  WAL, a legacy kotonoha file gets the ``db upgrade`` hint, a device or directory is
  not opened at all.
- **Private from birth.** :func:`create_private` makes a new file ``0600`` before
  SQLite opens it; SQLite gives its ``-wal`` and ``-shm`` files the database file's
  mode, so all three hold the community's conversations for the owner alone,
  whatever the umask.
- **Tell the truth.** :func:`translate` maps a driver error to a typed error by its
  SQLite result code (never its message text) and, for the I/O errors SQLite reports
  for both, by looking at the disk: full (``DiskFullError``), read-only
  (``ReadOnlyDatabaseError``), locked (``DatabaseLockedError``), corrupt
  (``CorruptDatabaseError``). Each message says what to do next.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
from pathlib import Path

from kotonoha_bot.errors import (
    CorruptDatabaseError,
    DatabaseError,
    DatabaseLockedError,
    DatabaseUnavailableError,
    DiskFullError,
    ForeignDatabaseError,
    LegacyDatabaseError,
    ReadOnlyDatabaseError,
)

SQLITE_MAGIC = b"SQLite format 3\x00"
#: Tables only a current kotonoha database has (schema_migrations alone is common).
OURS = frozenset({"schema_migrations", "kotonoha_meta"})
#: Free bytes below which an I/O error is reported as a full disk.
FULL_MARGIN = 64 * 1024

# SQLite primary result codes (the low byte of the extended code).
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB, _PERM = (
    5, 6, 8, 10, 11, 13, 14, 26, 3,
)  # fmt: skip


def classify(conn: sqlite3.Connection) -> str:
    """``empty``, ``current`` (kotonoha's), ``legacy`` or ``foreign``, from sqlite_master."""
    rows = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
    if not rows:
        return "empty"
    tables = {str(name) for kind, name in rows if kind == "table"}
    if tables >= OURS:
        return "current"
    if "sessions" in tables and "schema_migrations" not in tables:
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(sessions)")}
        if {"session_key", "messages"} <= columns:
            return "legacy"
    return "foreign"


def check_openable(path: Path) -> bool:
    """Refuse what kotonoha must not open; True when the file exists already.

    Only reads: nothing is created, and the file is opened read-only.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DatabaseUnavailableError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ForeignDatabaseError(
            f"{path} is {what}; point DATABASE_PATH / --database at a .db file"
        )
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        # /proc/self/mem and friends: "regular", 0 bytes long, and unreadable.
        raise ForeignDatabaseError(
            f"{path} cannot be read as a file ({exc.strerror}); point DATABASE_PATH /"
            " --database at a .db file"
        ) from None
    if st.st_size == 0 and not head:
        return True
    if head != SQLITE_MAGIC:
        raise ForeignDatabaseError(
            f"{path} is not a SQLite database (it does not start with the SQLite header);"
            " it was left unchanged — check the path"
        )
    kind = _classify_file(path)
    if kind == "legacy":
        raise LegacyDatabaseError(
            f"{path} is a database of the legacy kotonoha bot; convert it in place (after a"
            f" backup) with `kotonoha db upgrade --database sqlite:///{path}`"
        )
    if kind == "foreign":
        raise ForeignDatabaseError(
            f"{path} is a SQLite database of another program (it has tables but no"
            " kotonoha schema); it was left unchanged — choose a new file for kotonoha"
        )
    return True


def _classify_file(path: Path) -> str:
    """Classify read-only; if even that fails (no room for a -shm), read the main file
    alone, and let the real open report the disk's state."""
    uri = path.resolve().as_uri()
    for query in ("?mode=ro", "?mode=ro&immutable=1"):
        try:
            conn = sqlite3.connect(uri + query, uri=True)
            try:
                return classify(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            error = exc
    raise translate(path, "reading the schema", error) from None


def create_private(path: Path) -> None:
    """Create ``path`` (and missing parent directories) readable by its owner only."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        return
    except OSError as exc:
        raise _os_error(path, f"creating {path}", exc) from None


def make_private(path: Path) -> None:
    """``chmod 600`` a file we wrote (best effort: it may live on a filesystem without modes)."""
    with contextlib.suppress(OSError):
        path.chmod(0o600)


def _os_error(path: Path, what: str, exc: OSError) -> DatabaseError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"{what}: the disk holding {path.parent} is full; free space and retry"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyDatabaseError(
            f"{what}: {path.parent} is not writable ({exc.strerror}); fix its permissions or"
            " mount, or choose another location"
        )
    return DatabaseUnavailableError(f"{what}: {exc.strerror}")


def _free_bytes(path: Path) -> int | None:
    """Bytes free on the filesystem of ``path``; None when unknown or not a disk (/proc)."""
    for candidate in (path, path.parent):
        with contextlib.suppress(OSError):
            st = os.statvfs(candidate)
            return st.f_bavail * st.f_frsize if st.f_blocks else None
    return None


def _writable(path: Path) -> bool:
    if path.exists() and not os.access(path, os.W_OK):
        return False
    if not os.access(path.parent, os.W_OK):
        return False
    with contextlib.suppress(OSError):
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return False
    return True


def translate(path: Path, what: str, exc: sqlite3.Error) -> DatabaseError:
    """The typed error for a sqlite3 exception on ``path`` (by result code, then the disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    free = _free_bytes(path)
    if primary == _FULL or (primary == _IOERR and free is not None and free < FULL_MARGIN):
        return DiskFullError(
            f"{what}: the disk holding {path} is full; this step's changes were rolled back"
            " and the file is intact — free space and retry"
        )
    if primary in (_READONLY, _PERM) or (primary in (_IOERR, _CANTOPEN) and not _writable(path)):
        return ReadOnlyDatabaseError(
            f"{what}: {path} cannot be written (the file or its directory is read-only for"
            f" uid {os.getuid()}); nothing was changed — fix the permissions or mount"
        )
    if primary in (_BUSY, _LOCKED):
        return DatabaseLockedError(
            f"{what}: {path} is locked by another process for longer than the busy timeout"
            " (SQLITE_BUSY_TIMEOUT_MS); nothing was changed — retry, or stop the other writer"
        )
    if primary in (_CORRUPT, _NOTADB):
        return CorruptDatabaseError(
            f"{what}: {path} is damaged ({text}); keep the file, and restore your latest"
            f" backup into a new file: `kotonoha db restore BACKUP --database sqlite:///NEW.db`"
        )
    if primary == _CANTOPEN:
        return DatabaseUnavailableError(f"{what}: cannot open {path} ({text})")
    if primary == _IOERR:
        return DatabaseUnavailableError(
            f"{what}: {path}: input/output error from the disk ({text})"
        )
    if isinstance(exc, sqlite3.IntegrityError):
        return DatabaseError(f"{what}: constraint failed ({text})")
    return DatabaseError(f"{what}: {path}: {text}")
