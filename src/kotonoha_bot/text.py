"""Text rules shared by every layer: normalisation, the NUL rule, keyword tokens.

This module sits below ``db/`` and ``knowledge/`` so that both backends and the
knowledge layer apply exactly the same rules (the invariant in DESIGN.md).

**The NUL rule.** U+0000 can never be stored (PostgreSQL rejects it in ``text``;
SQLite would silently truncate it in some tools). The storage contract rejects
text containing it with :class:`InvalidTextError`. Code that brings text in from
outside (files, Discord, legacy databases) calls :func:`replace_nul`, which turns
every U+0000 into U+FFFD (the replacement character) and reports how many it
replaced, so nothing is dropped silently.

**Keyword tokens.** PostgreSQL has no Japanese parser and SQLite's FTS5 trigram
tokenizer cannot match two-character words, so both backends index the output of
:func:`keyword_tokens`: text is NFKC-normalised and lower-cased, then split into
runs of one script. Latin letters and digits give whole words; Han, Hiragana and
Katakana runs give character bigrams (東京都 -> 東京 京都), and each Han character
is also indexed alone so a one-character query (猫) still matches. Queries use the
same function (see :func:`query_tokens`).

**Which query terms count (both backends, one rule).** A keyword query keeps only
terms that carry information: English function words (:data:`STOP_WORDS`) are
dropped before searching, and so is any term found in more than
:data:`MAX_TERM_SHARE` of the searched chunks (an IDF floor: "how", "game" or the
bigram "ます" match half a community's notes and would otherwise pull in rows that
share nothing but grammar). :func:`keyword_plan` makes that decision from the
scope's document frequencies (query terms found nowhere still count against
coverage), and :func:`bm25_score` scores a chunk — BM25 for the
order, and the *coverage* (IDF-weighted share of the informative query terms the
chunk contains, 0..1) for fusion and the relevance floor. Both backends compute
the frequencies over the same scope and call these functions (SQLite in Python,
PostgreSQL with the same formula and the weights passed in), so they rank alike.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kotonoha_bot.errors import InvalidTextError

NUL = "\x00"
REPLACEMENT = "\ufffd"

_WS_RE = re.compile(r"[ \t\f\v\u3000]+")
_NL_RE = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC, unified newlines, runs of spaces collapsed, at most one blank line."""
    text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_WS_RE.sub(" ", line).strip() for line in text.split("\n")]
    return _NL_RE.sub("\n\n", "\n".join(lines)).strip()


def replace_nul(text: str) -> tuple[str, int]:
    """Apply the NUL rule at an input edge: U+0000 -> U+FFFD, with the count replaced."""
    count = text.count(NUL)
    if count:
        text = text.replace(NUL, REPLACEMENT)
    return text, count


def check_text(value: str, where: str) -> str:
    """Reject text the storage contract cannot store (the NUL rule); return it unchanged."""
    if not isinstance(value, str):
        raise InvalidTextError(f"{where}: expected text, got {type(value).__name__}")
    if NUL in value:
        raise InvalidTextError(
            f"{where}: text contains a NUL character (U+0000) at offset {value.index(NUL)};"
            " replace it (kotonoha_bot.text.replace_nul) before storing"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTextError(
            f"{where}: text is not valid Unicode (lone surrogate at offset {exc.start})"
        ) from None
    return value


_LATIN = "latin"
_HAN = "han"
_HIRA = "hira"
_KATA = "kata"


def _script(ch: str) -> str | None:
    code = ord(ch)
    if ch.isascii():
        return _LATIN if ch.isalnum() else None
    if 0x3040 <= code <= 0x309F:
        return _HIRA
    if 0x30A0 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF:
        return _KATA
    if (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0xF900 <= code <= 0xFAFF
        or 0x20000 <= code <= 0x2FA1F
        or ch in "々〆"
    ):
        return _HAN
    if ch.isalnum():
        # Other alphabets (accented Latin, Cyrillic, Hangul...) behave like words.
        return _LATIN
    return None


def _runs(text: str) -> list[tuple[str, str]]:
    runs: list[tuple[str, str]] = []
    current: list[str] = []
    current_script: str | None = None
    for ch in text:
        script = _script(ch)
        if script != current_script:
            if current and current_script is not None:
                runs.append((current_script, "".join(current)))
            current = []
            current_script = script
        if script is not None:
            current.append(ch)
    if current and current_script is not None:
        runs.append((current_script, "".join(current)))
    return runs


def _bigrams(run: str) -> list[str]:
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]


def keyword_tokens(text: str) -> list[str]:
    """Tokens to index for ``text`` (order kept, duplicates kept for term frequency)."""
    tokens: list[str] = []
    for script, run in _runs(unicodedata.normalize("NFKC", text).lower()):
        if script == _LATIN:
            tokens.append(run)
            continue
        tokens.extend(_bigrams(run))
        if script == _HAN and len(run) > 1:
            tokens.extend(run)
    return tokens


def query_tokens(text: str) -> list[str]:
    """Distinct tokens of a query, in order: the same rule as indexing, without unigrams."""
    seen: dict[str, None] = {}
    for script, run in _runs(unicodedata.normalize("NFKC", text).lower()):
        if script == _LATIN:
            seen.setdefault(run, None)
        else:
            for tok in _bigrams(run):
                seen.setdefault(tok, None)
    return list(seen)


#: English words that carry no information in a keyword query (articles, pronouns,
#: auxiliaries, prepositions, question words). Japanese needs no list: its particles
#: appear inside bigrams, which the document-share floor removes when they are common.
STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "don",
        "done",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "whose",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
    ]
)
#: At most this many terms of a query are looked up (the last ones: the end of a long
#: message matters most); each costs one index lookup for its document frequency.
MAX_QUERY_TERMS = 48
#: A term in more than this share of the searched chunks is dropped from the query.
MAX_TERM_SHARE = 1 / 3
#: ... but a term in at most this many chunks is always kept (tiny knowledge bases).
MIN_KEPT_DF = 2
BM25_K1 = 1.2
BM25_B = 0.75


def query_terms(text: str) -> list[str]:
    """:func:`query_tokens` without stop words (the last MAX_QUERY_TERMS): what is looked up."""
    return [t for t in query_tokens(text) if t not in STOP_WORDS][-MAX_QUERY_TERMS:]


@dataclass(frozen=True, slots=True)
class KeywordPlan:
    """The informative terms of a query and their IDF weights, for one search scope.

    ``missing_weight`` is the weight of query terms no chunk in the scope contains:
    nothing can match them, but they still count against coverage (a question about
    "refund policy" is not answered by a chunk that only shares "T-shirt").
    """

    terms: tuple[str, ...]
    weights: tuple[float, ...]
    missing_weight: float = 0.0

    @property
    def total_weight(self) -> float:
        """Sum of every weight: a chunk holding every query term has coverage 1."""
        return sum(self.weights) + self.missing_weight


def bm25_idf(df: int, n_docs: int) -> float:
    """BM25's (always positive) inverse document frequency."""
    return math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


def df_limit(n_docs: int) -> int:
    """The largest document frequency a kept term may have in a scope of ``n_docs``."""
    return max(math.floor(MAX_TERM_SHARE * n_docs), MIN_KEPT_DF)


def df_cap(n_docs: int) -> int:
    """Backends count a term's documents only up to this (``df_limit`` + 1).

    Whether a term is kept needs no more; a count that stops there keeps a common
    term ("lt" in every "LT-1042" chunk) from costing a scan of the whole scope.
    """
    return df_limit(n_docs) + 1


def keyword_plan(terms: Sequence[str], df: Mapping[str, int], n_docs: int) -> KeywordPlan | None:
    """Keep the terms that carry information in this scope; None when nothing matches.

    ``df`` may be capped at :func:`df_cap`. When every term that occurs is too common,
    the least common one (the first of those tied at the cap) is kept: the query has
    nothing better, and a one-word search should still find its rows.
    """
    present = [t for t in terms if df.get(t, 0) > 0]
    if not present:
        return None
    limit = df_limit(n_docs)
    kept = [t for t in present if df[t] <= limit] or [min(present, key=lambda t: df[t])]
    missing = sum(bm25_idf(0, n_docs) for t in terms if df.get(t, 0) == 0)
    return KeywordPlan(tuple(kept), tuple(bm25_idf(df[t], n_docs) for t in kept), missing)


def bm25_score(
    plan: KeywordPlan, tf: Mapping[str, int], doc_len: int, avg_len: float
) -> tuple[float, float]:
    """(BM25 score, coverage 0..1) of a chunk with term counts ``tf`` and ``doc_len`` tokens."""
    score = 0.0
    matched = 0.0
    norm = BM25_K1 * (1.0 - BM25_B + BM25_B * max(doc_len, 1) / max(avg_len, 1.0))
    for term, weight in zip(plan.terms, plan.weights, strict=True):
        f = tf.get(term, 0)
        if f:
            score += weight * f * (BM25_K1 + 1.0) / (f + norm)
            matched += weight
    return score, matched / plan.total_weight


_JAPANESE_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_LETTER_RE = re.compile(r"[A-Za-z]")


def japanese_share(text: str) -> float:
    """Share of Japanese among the Japanese and Latin letters of ``text`` (0.5 if neither).

    The e5 provider centres vectors by it, and hybrid search compares a query's share
    with a chunk's to tell a hit in the other language (see ``knowledge/search.py``).
    """
    ja = len(_JAPANESE_RE.findall(text))
    latin = len(_LATIN_LETTER_RE.findall(text))
    return ja / (ja + latin) if ja + latin else 0.5


def keyword_document(text: str) -> str:
    """The space-separated token string both backends store in their full-text index."""
    return " ".join(keyword_tokens(text))


def human_size(n: int) -> str:
    """Bytes as people read them: ``512 B``, ``1.5 KiB``, ``781.0 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
