"""Split a reply into Discord messages (2000 characters each) without breaking code.

Text is cut between paragraphs first, then between sentences, then between words,
and only as a last resort inside a word. A fenced code block (a line starting with
```` ``` ```` or ``~~~``) is never cut when it fits in one message; when a single
block is longer than a message, it is cut between lines and every part is closed
and reopened with the same fence (language tag included), so each message renders
as code on its own. Fences are recognised only at the start of a line.

Length is measured in UTF-16 code units (an emoji outside the BMP counts as two),
which is never less than what Discord counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISCORD_LIMIT = 2000

_FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
# Where a sentence may end: after 。！？!? (and closing brackets/quotes), after ". ".
_SENTENCE_END_RE = re.compile(r"(?<=[。！？!?…])[」』）)\]\"'”’]*[ \t]*|(?<=\.)[ \t]+|\n")
_SPACE_RE = re.compile(r"(?<=\s)")


def discord_length(text: str) -> int:
    """Characters as Discord limits them (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


@dataclass
class _Piece:
    text: str
    sep: str  # what joined it to the previous piece in the original ("\n" or "\n\n")
    fence: str | None = None  # the opening fence line of a code block
    marker: str = ""  # the fence characters that close it (``` or ~~~~ ...)


def _pieces(text: str) -> list[_Piece]:
    """Paragraphs and whole code blocks, in order."""
    pieces: list[_Piece] = []
    lines = text.split("\n")
    i = 0
    blank_before = False
    para: list[str] = []

    def flush_para() -> None:
        nonlocal para, blank_before
        if para:
            pieces.append(_Piece("\n".join(para), "\n\n" if blank_before else "\n"))
            blank_before = False
        para = []

    while i < len(lines):
        line = lines[i]
        m = _FENCE_RE.match(line)
        if m:
            flush_para()
            marker = m.group(1)
            block = [line]
            i += 1
            while i < len(lines):
                block.append(lines[i])
                stripped = lines[i].strip()
                i += 1
                if stripped.startswith(marker[0] * len(marker)) and not stripped.strip(marker[0]):
                    break
            pieces.append(_Piece("\n".join(block), "\n\n" if blank_before else "\n", line, marker))
            blank_before = False
            continue
        if not line.strip():
            flush_para()
            blank_before = bool(pieces) or blank_before
            i += 1
            continue
        para.append(line)
        i += 1
    flush_para()
    return pieces


def _hard_cut(text: str, limit: int) -> list[str]:
    """Cut anywhere (never inside a surrogate pair: Python strings hold code points)."""
    parts: list[str] = []
    current = ""
    size = 0
    for ch in text:
        w = discord_length(ch)
        if size + w > limit and current:
            parts.append(current)
            current, size = "", 0
        current += ch
        size += w
    if current:
        parts.append(current)
    return parts


def _pack(segments: list[str], limit: int) -> list[str]:
    """Join consecutive segments while they fit; oversized ones are split further."""
    out: list[str] = []
    current = ""
    for seg in segments:
        if discord_length(current + seg) <= limit:
            current += seg
            continue
        if current.strip():
            out.append(current)
        current = ""
        if discord_length(seg) <= limit:
            current = seg
            continue
        words = [w for w in _SPACE_RE.split(seg) if w]
        parts = _pack(words, limit) if len(words) > 1 else _hard_cut(seg, limit)
        out.extend(parts[:-1])
        current = parts[-1]
    if current.strip():
        out.append(current)
    return out


def _split_prose(text: str, limit: int) -> list[str]:
    segments: list[str] = []
    start = 0
    for m in _SENTENCE_END_RE.finditer(text):
        if m.end() > start:
            segments.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        segments.append(text[start:])
    return [p.strip() for p in _pack(segments, limit) if p.strip()]


def _split_code(piece: _Piece, limit: int) -> list[str]:
    assert piece.fence is not None
    opener = piece.fence.strip()
    if discord_length(opener) > limit // 4:  # an absurd info string: keep the fence only
        opener = piece.marker
    closer = piece.marker
    lines = piece.text.split("\n")[1:]
    if lines and lines[-1].strip() and not lines[-1].strip().strip(closer[0]):
        lines = lines[:-1]  # the original closing fence; every part gets its own
    room = limit - discord_length(opener) - discord_length(closer) - 2
    body: list[str] = []
    for line in lines:
        body.extend(_hard_cut(line, room) if discord_length(line) > room else [line])
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for line in body:
        w = discord_length(line) + (1 if current else 0)
        if current and size + w > room:
            parts.append("\n".join(current))
            current, size = [], 0
            w = discord_length(line)
        current.append(line)
        size += w
    if current or not parts:
        parts.append("\n".join(current))
    return [f"{opener}\n{p}\n{closer}" for p in parts]


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Messages of at most ``limit`` characters; code blocks intact or re-fenced."""
    if limit < 40:
        raise ValueError("limit must leave room for a code fence (at least 40)")
    text = text.replace("\r\n", "\n").strip("\n")
    if not text.strip():
        return []
    if discord_length(text) <= limit:
        return [text]
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text):
        candidate = f"{current}{piece.sep}{piece.text}" if current else piece.text
        if discord_length(candidate) <= limit:
            current = candidate
            continue
        if current:
            chunks.append(current)
            current = ""
        if discord_length(piece.text) <= limit:
            current = piece.text
            continue
        parts = (
            _split_code(piece, limit)
            if piece.fence is not None
            else _split_prose(piece.text, limit)
        )
        chunks.extend(parts[:-1])
        current = parts[-1]
    if current:
        chunks.append(current)
    return [c for c in chunks if c.strip()]
