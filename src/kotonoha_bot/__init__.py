"""kotonoha-bot: a self-hosted Discord companion bot that remembers.

Importing the package sets ``OPENBLAS_THREAD_TIMEOUT`` unless the environment sets it
already. After every multi-threaded BLAS call (the float32 vector cache's scan, the
numpy fallback of the int4/int8 kernels, a local embedder's matrix products) OpenBLAS
keeps its worker threads spinning for about 2^28 cycles (~90 ms of CPU on a 2-core
host) waiting for more work: on a small NAS each search would burn a core that the
database, the event loop and the other services need. With 2^4 cycles the workers
sleep right away; the BLAS calls still use every thread (measured in issue 16, round 4:
CPU per search + 50 ms idle 56 ms -> 5 ms at 10k x 1536). It has to happen before
numpy is first imported, and every entry point (``kotonoha``, ``python -m
kotonoha_bot``) imports this package first.
"""

import os

#: log2 of the cycles an idle OpenBLAS worker spins before it sleeps (OpenBLAS's minimum).
OPENBLAS_THREAD_TIMEOUT = "4"

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)

__version__ = "0.1.0"
