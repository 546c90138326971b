"""deploy/backup/pg-backup.sh against a real PostgreSQL 18 with its own pg_dump.

The script is what the compose ``backup`` profile runs; here it runs on the host
with the test server's binaries: dumps are written atomically, checked, rotated,
restorable, failures are reported without the password, SIGTERM stops the loop.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.pg import PgServer, run

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "backup" / "pg-backup.sh"
NAME_RE = re.compile(r"^kotonoha-\d{8}T\d{6}Z(-\d+)?\.dump$")
PASSWORD_MARKER = "PGBACKUP-PW-6d1e0c"


def pg_bin(server: PgServer) -> Path:
    if server.handle is not None:
        return Path(server.handle.bin_path)
    found = shutil.which("pg_dump")
    if not found:
        pytest.skip("no pg_dump for TEST_DATABASE_URL")
    return Path(found).parent


def libpq_env(url: str, bin_dir: Path, backup_dir: Path, **extra: str) -> dict[str, str]:
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PGHOST": host,
        "PGUSER": parts.username or "postgres",
        "PGDATABASE": parts.path.lstrip("/"),
        "PGPASSWORD": parts.password or PASSWORD_MARKER,
        "BACKUP_DIR": str(backup_dir),
    }
    if parts.port:
        env["PGPORT"] = str(parts.port)
    env.update(extra)
    return env


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def psql(bin_dir: Path, env: dict[str, str], sql: str) -> str:
    return subprocess.run(
        [str(bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


@pytest.fixture
def source_url(postgres_server: PgServer) -> str:
    return str(run(postgres_server.create_database("bk")))


def test_dumps_rotate_and_restore(
    postgres_server: PgServer, source_url: str, tmp_path: Path
) -> None:
    bin_dir = pg_bin(postgres_server)
    backups = tmp_path / "backups"
    env = libpq_env(source_url, bin_dir, backups, BACKUP_ONCE="1", BACKUP_KEEP="2")
    psql(bin_dir, env, "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
    psql(bin_dir, env, "INSERT INTO notes VALUES (1, 'こんにちは'), (2, 'kotonoha'), (3, '記憶')")

    for _ in range(3):
        proc = run_script(env)
        assert proc.returncode == 0, proc.stderr
        assert "backup written" in proc.stderr
        time.sleep(1.1)  # one file per second by name

    files = sorted(p.name for p in backups.iterdir())
    assert len(files) == 2, files
    assert all(NAME_RE.match(f) for f in files), files
    assert "removed old backup" in proc.stderr
    for f in files:
        assert (backups / f).stat().st_mode & 0o077 == 0  # private to the owner

    # The newest dump restores into an empty database with the same rows.
    target_url = str(run(postgres_server.create_database("restore")))
    target_env = libpq_env(target_url, bin_dir, backups)
    subprocess.run(
        [str(bin_dir / "pg_restore"), "--no-owner", "--exit-on-error", "-d",
         target_env["PGDATABASE"], str(backups / files[-1])],
        env=target_env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    restored = psql(
        bin_dir, target_env, "SELECT string_agg(id || ':' || body, ',' ORDER BY id) FROM notes"
    )
    assert restored == "1:こんにちは,2:kotonoha,3:記憶"
    run(postgres_server.drop_database(target_url))


def test_a_failed_dump_leaves_no_file_and_no_password(
    postgres_server: PgServer, tmp_path: Path
) -> None:
    bin_dir = pg_bin(postgres_server)
    backups = tmp_path / "backups"
    missing = postgres_server.url_for(f"missing_{uuid.uuid4().hex[:8]}")
    env = libpq_env(missing, bin_dir, backups, BACKUP_ONCE="1", PGPASSWORD=PASSWORD_MARKER)
    proc = run_script(env)
    assert proc.returncode != 0
    assert "FAILED" in proc.stderr
    assert PASSWORD_MARKER not in proc.stderr + proc.stdout
    assert list(backups.iterdir()) == []  # no partial file left behind


@pytest.mark.parametrize(
    ("name", "value"),
    [("BACKUP_KEEP", "0"), ("BACKUP_KEEP", "x"), ("BACKUP_INTERVAL_HOURS", "soon")],
)
def test_bad_settings_are_refused(tmp_path: Path, name: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "BACKUP_DIR": str(tmp_path), name: value}
    proc = run_script(env)
    assert proc.returncode == 2
    assert name in proc.stderr


def test_loop_stops_promptly_on_sigterm(
    postgres_server: PgServer, source_url: str, tmp_path: Path
) -> None:
    bin_dir = pg_bin(postgres_server)
    backups = tmp_path / "backups"
    env = libpq_env(source_url, bin_dir, backups, BACKUP_INTERVAL_HOURS="1")
    proc = subprocess.Popen(["/bin/sh", str(SCRIPT)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (backups.exists() and any(NAME_RE.match(p.name) for p in backups.iterdir())):
            assert time.monotonic() < deadline, "no first backup"
            assert proc.poll() is None, "the loop exited"
            time.sleep(0.1)
        time.sleep(0.3)  # now sleeping until the next interval
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
