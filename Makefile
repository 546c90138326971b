# Everything runs from a project-local virtualenv that these targets create.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench clean venv chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,e5,dashboard]'
	touch $(STAMP)

## The main job on the embedded default (SQLite, no keys, no server).
demo: $(STAMP)
	$(BIN)/kotonoha demo

## The whole test suite (SQLite files and a throwaway PostgreSQL + pgvector, and
## Debian's Chromium for the dashboard's browser tests).
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

## Debian's Chromium (Playwright drives it through executable_path; it never downloads
## a browser). Installed with apt-get when missing and we are root; otherwise the
## browser tests skip locally and fail under CI.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the dashboard's browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "no $(CHROMIUM): the dashboard's browser tests will skip (as root: apt-get install chromium)"; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) data/demo.db* .pytest_cache .mypy_cache .ruff_cache
