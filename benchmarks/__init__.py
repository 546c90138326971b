"""Benchmarks for kotonoha-bot's storage backends (not part of the installed package).

Run ``python -m benchmarks`` (all systems, writes docs/PERFORMANCE.md and docs/plots/)
or ``python -m benchmarks.bench_sqlite`` (the SQLite backend alone). The comparison
systems are in the ``bench`` extra: ``pip install -e '.[dev,bench]'``.
"""
