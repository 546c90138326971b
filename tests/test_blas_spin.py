"""Importing kotonoha_bot stops idle OpenBLAS workers from spinning (see its docstring)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import kotonoha_bot, numpy, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"


def _probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if env_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_the_package_sets_the_shortest_blas_spin_before_numpy_loads() -> None:
    assert _probe(None) == "4"


def test_an_operators_own_blas_setting_wins() -> None:
    assert _probe("12") == "12"
