"""Small helpers shared by the benchmarks: timing, memory, machine facts, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear interpolation."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    if seconds != seconds:  # NaN
        return "—"
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and its children (shared pages split fairly)."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += int(p.memory_full_info().pss)
        except psutil.Error:
            continue
    return total


def files_bytes(folder: Path, pattern: str) -> int:
    """Bytes of the files in ``folder`` matching ``pattern`` (a database and its -wal/-shm)."""
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def dir_bytes(path: Path) -> int:
    """Bytes of all files under ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def evict_from_page_cache(*paths: Path) -> None:
    """Ask the kernel to drop these files' cached pages (no-op where unsupported)."""
    for path in paths:
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best_time(fn: Callable[[], Any], repeat: int = 7) -> float:
    """The fastest of ``repeat`` runs of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(
    dim: int = 1536, total_bytes: int = 1 << 30, repeat: int = 15
) -> dict[str, float]:
    """numpy's read bandwidth on this host (bytes/s) over a float32 matrix far beyond cache.

    Two kernels: ``M @ q`` (BLAS sgemv, what an exact search does) and
    ``np.add.reduce(M, axis=0)``; the best of several runs of each.
    """
    rows = total_bytes // (dim * 4)
    m = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    q = np.ones(dim, dtype=np.float32)
    out = {
        "matvec": m.nbytes / best_time(lambda: m @ q, repeat),
        "add.reduce": m.nbytes / best_time(lambda: np.add.reduce(m, axis=0), repeat),
    }
    out["best"] = max(out.values())
    return out


def best_bandwidth(*measurements: dict[str, float]) -> dict[str, float]:
    """Per kernel, the best of several ``read_bandwidth`` results (e.g. start and end)."""
    return {k: max(m[k] for m in measurements) for k in measurements[0]}


def machine() -> dict[str, str]:
    """CPU, cores, memory and versions, for the report header."""
    import sys

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, sep, *body])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
