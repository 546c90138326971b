"""Benchmarks for kotonoha-bot's storage backends (not part of the installed package).

Run ``python -m benchmarks`` (all systems, writes docs/PERFORMANCE.md and docs/plots/)
or ``python -m benchmarks.bench_sqlite`` (the SQLite backend alone). The comparison
systems are in the ``bench`` extra: ``pip install -e '.[dev,bench]'``.

Importing this package (which ``python -m benchmarks...`` does before anything else)
sets ``OPENBLAS_THREAD_TIMEOUT`` unless it is set already (through
:mod:`kotonoha_bot`, which the bot needs as well): after each multi-threaded
BLAS call (numpy's exact reference, the float32 cache's scan) OpenBLAS keeps its worker
thread spinning for about 2^28 cycles (~90 ms of CPU on this host) waiting for more
work. The systems take turns query by query, so with the default one of the two cores
was burning in the benchmark's own process for the whole side-by-side run, slowing
whichever system came next (most of all the two-process PostgreSQL: client and
server), but not the ef_search sweeps, which run without numpy (issue 16, round 4).
With 2^4 cycles the workers sleep right away; the BLAS calls still use every thread.
It has to be set before numpy is first imported, hence here.
"""

# kotonoha_bot's own __init__ sets it (the bot needs it as much as the benchmark does);
# importing the package here, first, gives every benchmark process it before numpy.
import kotonoha_bot  # noqa: F401
