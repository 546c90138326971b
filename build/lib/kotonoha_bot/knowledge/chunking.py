"""Cut documents into chunks for embedding and keyword search.

Text is normalised once (:func:`normalize_for_storage`), then cut at the natural
places of Japanese and English writing, in this order of preference:

1. Markdown headings start a new chunk (a chunk never spans two sections), and each
   chunk remembers its heading path (``("Guide", "Install")``) as a location;
2. fenced code blocks (```` ``` ```` or ``~~~``) are atoms: never split, even when
   longer than ``max_chars`` (such a block becomes a chunk of its own);
3. lines and sentences: a sentence ends after ``。!?`` (NFKC turns ``！？`` into
   ``!?``) plus closing brackets/quotes, and after ``.`` followed by a space when the
   word before it is not an abbreviation (``e.g.``, ``Dr.``), an initial (``J.``) or a
   list number (``1.``); decimals and URLs never split because no space follows;
4. a single sentence longer than the chunk is hard-split, preferring a space or
   ``、,;:`` near the end of the window.

Sentences are packed greedily up to ``max_chars``. Each chunk after the first in a
section starts with an overlap of at most ``overlap_chars``: whole trailing
sentences of the previous chunk where they fit, otherwise the tail of its last
sentence (cut at a space when there is one). Chunk ``content`` is always the exact
slice ``normalized[start:end]``.

Chunk keys hash (id_prefix, content, occurrence of that content), so chunking the
same text again gives the same keys and a changed paragraph changes only the keys
of the chunks that contain it.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from kotonoha_bot.errors import InvalidInputError
from kotonoha_bot.text import check_text, normalize_text

__all__ = [
    "Chunk",
    "chunk_key",
    "chunk_text",
    "content_hash",
    "normalize_for_query",
    "normalize_for_storage",
]

_ABBREVIATIONS = """
e.g i.e etc vs cf al approx ca fig no nos vol p pp mr mrs ms dr prof st jr sr inc ltd
co corp dept est a.m p.m u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec ver v
"""
#: Words that end with a period but do not end a sentence (compared lower-cased).
ABBREVIATIONS: frozenset[str] = frozenset(_ABBREVIATIONS.split())

_OPEN_FENCE_RE = re.compile(r"^(`{3,})[^`]*$|^(~{3,}).*$")
_HEADING_RE = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
# A sentence ends after Japanese/any ! ? (runs like "!?" included) or a period,
# followed by closing brackets or quotes.
_TERMINATOR_RE = re.compile(r"[。｡!?]+[」』）)\]】〕\"'”’]*|\.+[」』）)\]】〕\"'”’]*")
_CLOSERS = "」』）)]】〕\"'”’"
_SOFT_BREAKS = "、,，;；:："


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a normalised document; ``content == normalized[start:end]``."""

    chunk_key: str
    content: str
    index: int
    start: int
    end: int
    heading: tuple[str, ...] = ()
    has_code: bool = False

    @property
    def location(self) -> str:
        """The heading path as one line (``"Guide > Install"``), empty when none."""
        return " > ".join(self.heading)

    def metadata(self) -> dict[str, object]:
        """JSON-ready facts to store with the chunk (offsets, heading path)."""
        meta: dict[str, object] = {"start": self.start, "end": self.end}
        if self.heading:
            meta["heading"] = self.location
        if self.has_code:
            meta["has_code"] = True
        return meta


@dataclass(frozen=True, slots=True)
class _Unit:
    start: int
    end: int
    kind: str  # "text" | "code" | "heading"
    heading: tuple[str, ...] = field(default=())


# --- normalisation -----------------------------------------------------------------


def _fence_close(line: str, opener: str) -> bool:
    stripped = line.strip()
    char = opener[0]
    run = len(stripped) - len(stripped.lstrip(char))
    return run >= len(opener) and stripped[run:].strip() == ""


def _open_fence(line: str) -> str | None:
    m = _OPEN_FENCE_RE.match(line.strip())
    if not m:
        return None
    return m.group(1) or m.group(2)


def _dedent(lines: list[str], fence_line: str) -> list[str]:
    """Remove the fence's own indentation (a fence inside a list item) from its body."""
    cut = len(fence_line) - len(fence_line.lstrip(" \t"))
    out = []
    for ln in lines:
        k = 0
        while k < cut and k < len(ln) and ln[k] in " \t":
            k += 1
        out.append(ln[k:])
    return out


def normalize_for_storage(text: str) -> str:
    """The one normalisation of stored text: :func:`kotonoha_bot.text.normalize_text`.

    Prose goes through ``normalize_text`` unchanged. Inside fenced code blocks
    leading indentation is kept (it carries meaning in code); those lines are only
    NFKC-normalised, right-stripped and dedented by the fence's own indentation. Idempotent.
    """
    text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = text.split("\n")
    parts: list[str] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        opener = _open_fence(lines[i])
        if opener is None:
            prose.append(lines[i])
            i += 1
            continue
        if prose:
            parts.append(normalize_text("\n".join(prose)))
            prose = []
        j = i + 1
        while j < len(lines) and not _fence_close(lines[j], opener):
            j += 1
        body = [ln.rstrip() for ln in lines[i + 1 : j]]
        while body and not body[0]:
            body.pop(0)
        while body and not body[-1]:
            body.pop()
        fence = [normalize_text(lines[i]), *_dedent(body, lines[i])]
        if j < len(lines):
            fence.append(normalize_text(lines[j]))
        parts.append("\n".join(fence))
        i = j + 1
    if prose:
        parts.append(normalize_text("\n".join(prose)))
    return "\n\n".join(p for p in parts if p)


def normalize_for_query(text: str) -> str:
    """Queries get the same rule as stored prose (so both sides compare alike)."""
    return normalize_text(text)


def content_hash(text: str) -> str:
    """sha256 (hex) of the normalised text: equal for texts that store identically."""
    return hashlib.sha256(normalize_for_storage(text).encode("utf-8")).hexdigest()


def chunk_key(id_prefix: str, content: str, occurrence: int = 0) -> str:
    """A stable key for ``content`` in the source ``id_prefix`` (n-th equal content)."""
    h = hashlib.sha256()
    # Length-prefixed fields, so no pair of (prefix, content) can collide by concatenation.
    for part in (id_prefix, content, str(occurrence)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:32]


# --- segmentation ------------------------------------------------------------------


def _is_sentence_period(line: str, dot: int, end: int) -> bool:
    """Whether the period run at line[dot:...] (terminator ending at ``end``) ends a sentence."""
    if end < len(line) and not line[end].isspace():
        return False  # "3.14", "example.com", "v1.2です"
    if line[dot : dot + 2] == "..":
        return True  # an ellipsis followed by a space
    word_start = dot
    while word_start > 0 and not line[word_start - 1].isspace():
        word_start -= 1
    word = line[word_start:dot].lstrip("(「『\"'“‘[").lower()
    if not word:
        return True
    if word in ABBREVIATIONS:
        return False
    if len(word) == 1 and word.isalpha():
        return False  # an initial: "J. R. R. Tolkien"
    if re.fullmatch(r"([a-z]\.)+[a-z]", word):
        return False  # "e.g", "u.s.a"
    return not (word.isdigit() and word_start == 0)  # "1. item" starts a list


def _sentence_spans(line: str) -> list[tuple[int, int]]:
    """Sentences of one line as (start, end) offsets within the line."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _TERMINATOR_RE.finditer(line):
        first = line[m.start()]
        end = m.end()
        if first == ".":
            if not _is_sentence_period(line, m.start(), end):
                continue
        elif first in "!?" and end < len(line):
            nxt = line[end]
            # "?" inside URLs and "Yahoo!Japan"-style ASCII runs are not sentence ends;
            # after Japanese text no space is expected.
            if not nxt.isspace() and nxt.isascii():
                continue
        spans.append((start, end))
        start = end
        while start < len(line) and line[start].isspace():
            start += 1
    if start < len(line):
        spans.append((start, len(line)))
    return [(s, e) for s, e in spans if line[s:e].strip()]


def _units(norm: str) -> list[_Unit]:
    units: list[_Unit] = []
    path: list[tuple[int, str]] = []
    lines = norm.split("\n")
    pos = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        line_start = pos
        opener = _open_fence(line)
        if opener is not None:
            j = i
            end = line_start + len(line)
            while j + 1 < len(lines):
                j += 1
                end += 1 + len(lines[j])
                if _fence_close(lines[j], opener):
                    break
            units.append(_Unit(line_start, end, "code", tuple(t for _, t in path)))
            pos = end + 1
            i = j + 1
            continue
        pos += len(line) + 1
        i += 1
        if not line.strip():
            continue
        hm = _HEADING_RE.match(line)
        if hm:
            level = len(hm.group(1))
            path = [(lv, t) for lv, t in path if lv < level]
            path.append((level, hm.group(2).strip()))
            units.append(
                _Unit(line_start, line_start + len(line), "heading", tuple(t for _, t in path))
            )
            continue
        heading = tuple(t for _, t in path)
        for s, e in _sentence_spans(line):
            units.append(_Unit(line_start + s, line_start + e, "text", heading))
    return units


def _hard_split(norm: str, unit: _Unit, limit: int) -> list[_Unit]:
    """Cut an over-long sentence into pieces of at most ``limit`` characters."""
    pieces: list[_Unit] = []
    pos = unit.start
    while unit.end - pos > limit:
        window = norm[pos : pos + limit]
        cut = limit
        for k in range(limit - 1, limit // 2, -1):
            if window[k].isspace() or window[k] in _SOFT_BREAKS:
                cut = k + 1
                break
        end = pos + cut
        piece_end = end
        while piece_end > pos and norm[piece_end - 1].isspace():
            piece_end -= 1
        pieces.append(_Unit(pos, piece_end, "text", unit.heading))
        pos = end
        while pos < unit.end and norm[pos].isspace():
            pos += 1
    if pos < unit.end:
        pieces.append(_Unit(pos, unit.end, "text", unit.heading))
    return pieces


# --- packing -----------------------------------------------------------------------


def chunk_text(
    text: str, *, max_chars: int, overlap_chars: int = 0, id_prefix: str = ""
) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``max_chars`` (code blocks excepted).

    Offsets refer to ``normalize_for_storage(text)``. Empty or blank text gives [].
    Text with a NUL character is rejected (apply :func:`kotonoha_bot.text.replace_nul`
    at the input edge first).
    """
    if max_chars < 1:
        raise InvalidInputError(f"chunk max_chars must be at least 1, got {max_chars}")
    if not 0 <= overlap_chars < max_chars:
        raise InvalidInputError(
            f"chunk overlap_chars must be from 0 to max_chars - 1 ({max_chars - 1}),"
            f" got {overlap_chars}"
        )
    check_text(text, f"chunk_text({id_prefix!r})")
    norm = normalize_for_storage(text)
    if not norm:
        return []

    units: list[_Unit] = []
    piece_limit = max_chars - overlap_chars
    for unit in _units(norm):
        if unit.kind != "code" and unit.end - unit.start > max_chars:
            pieces = _hard_split(norm, unit, piece_limit)
            if unit.kind == "heading":  # an absurdly long heading line still opens a section
                pieces[0] = _Unit(pieces[0].start, pieces[0].end, "heading", unit.heading)
            units.extend(pieces)
        else:
            units.append(unit)

    spans: list[tuple[int, int, int]] = []  # (start, end, unit giving the heading path)
    cur: list[int] = []
    cur_start = 0

    def overlap_start(nxt: _Unit) -> int | None:
        """Where the chunk after ``cur`` may start so that it repeats a little of it."""
        if overlap_chars == 0 or nxt.kind == "heading":
            return None
        prev_start = cur_start
        prev_end = units[cur[-1]].end
        floor = nxt.end - max_chars  # the new chunk must still fit
        best: int | None = None
        for j in reversed(cur[1:]):
            u = units[j]
            if u.kind != "text" or prev_end - u.start > overlap_chars or u.start < floor:
                break
            best = u.start
        if best is not None:
            return best
        last = units[cur[-1]]
        if last.kind != "text":
            return None
        s = max(prev_end - overlap_chars, floor, last.start, prev_start + 1)
        if s >= prev_end:
            return None
        tail = norm[s:prev_end]
        if s > 0 and not norm[s - 1].isspace() and any(c.isspace() for c in tail):
            # Start at a word boundary when the text has spaces (English); Japanese has none.
            s += next(k for k, c in enumerate(tail) if c.isspace())
        while s < prev_end and norm[s].isspace():
            s += 1
        return s if s < prev_end else None

    def close() -> tuple[int, int, int]:
        # The section a chunk belongs to is that of its first body unit, so a chunk
        # opening with "# Title" then "## Part" is located under "Title > Part".
        body = next((j for j in cur if units[j].kind != "heading"), cur[-1])
        return cur_start, units[cur[-1]].end, body

    for i, unit in enumerate(units):
        if cur and unit.kind == "heading" and any(units[j].kind != "heading" for j in cur):
            spans.append(close())
            cur = []
        if not cur:
            cur, cur_start = [i], unit.start
            continue
        if unit.end - cur_start <= max_chars:
            cur.append(i)
            continue
        spans.append(close())
        ov = overlap_start(unit)
        cur, cur_start = [i], (ov if ov is not None else unit.start)
    if cur:
        spans.append(close())

    code_starts = [u.start for u in units if u.kind == "code"]
    chunks: list[Chunk] = []
    seen: dict[str, int] = {}
    for index, (start, end, located) in enumerate(spans):
        content = norm[start:end]
        occurrence = seen.get(content, 0)
        seen[content] = occurrence + 1
        k = bisect.bisect_left(code_starts, start)
        has_code = k < len(code_starts) and code_starts[k] < end
        chunks.append(
            Chunk(
                chunk_key=chunk_key(id_prefix, content, occurrence),
                content=content,
                index=index,
                start=start,
                end=end,
                heading=units[located].heading,
                has_code=has_code,
            )
        )
    return chunks
