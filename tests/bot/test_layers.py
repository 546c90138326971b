"""The layers as the imports see them: the bot loads only the transfer tool's marker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_running_bot_imports_only_the_transfer_marker() -> None:
    """``kotonoha run`` (bot/runtime.py, the chat pipeline, the SQLite backend) loads
    ``transfer/marker.py`` and nothing else of the tool; a backup loads it when it runs."""
    code = (
        "import sys, kotonoha_bot.bot.runtime, kotonoha_bot.db.sqlite;"
        " tool = sorted(m for m in sys.modules if m.startswith('kotonoha_bot.transfer'));"
        " assert tool == ['kotonoha_bot.transfer', 'kotonoha_bot.transfer.marker'], tool;"
        " bad = [m for m in ('asyncpg', 'pgvector') if m in sys.modules];"
        " assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
