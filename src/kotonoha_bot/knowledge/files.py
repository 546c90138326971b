"""Files as they come from an operator's disk: which to read, how to decode, how to stream.

Ingest trusts nothing about a folder. The rules, each reported per file (a problem
with one file never stops the others):

- **Stay inside.** :func:`discover` walks only inside the folders it was given.
  A symlink whose target is outside that folder is skipped (``ln -s /etc/passwd
  corpus/x.txt`` must not make ``/etc/passwd`` searchable in a guild); symlinked
  folders are not followed (no loops, no escapes); hidden entries are skipped; other
  suffixes are listed as skipped. A path named on the command line is the operator's
  explicit choice and is read wherever it points.
- **Names are text.** A file name with bytes that are not UTF-8 is kept (its content
  is ingested) under a name with those bytes written as ``\\xNN`` (:func:`display_name`).
- **Encodings by a documented rule** (:func:`detect_encoding`), Japanese first:
  1. a byte-order mark: UTF-8, UTF-16 LE/BE, UTF-32 LE/BE;
  2. ISO-2022-JP when the file is 7-bit and holds its escape sequences;
  3. UTF-16 without a mark when NUL bytes sit on one parity only (ASCII-heavy text);
  4. any other NUL byte: a binary file, refused;
  5. strict UTF-8 (ASCII included);
  6. UTF-8 with a handful of broken bytes (under 1% of the non-ASCII bytes): decoded
     with U+FFFD and reported as invalid UTF-8 (UTF-8 Japanese often also "decodes"
     as CP932, so this comes first);
  7. strict CP932 (Shift_JIS with Windows' extensions) and strict EUC-JP; when both
     decode, the one with more kana and kanji and fewer half-width katakana wins;
  8. otherwise charset-normalizer's best guess (e.g. CP1252, GB18030, Big5), if it has one;
  9. nothing fits: refused as an unknown encoding.
  Decoded text with more than 1% control characters is refused as binary.
- **Bounded memory.** A file is read twice in blocks (detect, then decode) and cut
  into *segments* of about :data:`SEGMENT_CHARS` characters at a level-1 Markdown
  heading, else at a blank line, never inside a code fence; ingest handles one
  segment at a time, so a 50 MB file costs the memory of one segment, not of the file.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
import unicodedata
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kotonoha_bot.errors import InvalidInputError
from kotonoha_bot.knowledge.chunking import (
    closes_fence,
    heading_of,
    normalize_for_storage,
    open_fence,
)
from kotonoha_bot.text import replace_nul

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".text", ".rst"})
PDF_SUFFIXES = frozenset({".pdf"})
#: What ingest reads: text files by the encoding rule, PDFs by their text layer.
DOCUMENT_SUFFIXES = TEXT_SUFFIXES | PDF_SUFFIXES
#: A file on disk, or the bytes of one that arrived another way (a Discord attachment).
Source = Path | bytes
#: Bytes read per block when detecting and decoding.
BLOCK_BYTES = 1 << 20
#: Characters per segment (one segment is chunked, embedded and written at a time).
SEGMENT_CHARS = 256 * 1024
#: Longer lines are read in pieces (a file with no newline must not be one huge string).
MAX_LINE_CHARS = 1 << 20
#: Above this share of control characters decoded text is treated as binary.
MAX_CONTROL_SHARE = 0.01
#: UTF-8 with broken bytes is still read as UTF-8 below this share of non-ASCII bytes.
MAX_BROKEN_UTF8_SHARE = 0.01

_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
#: Control characters (C0 except tab, newlines, form feed; DEL; C1) that text does not hold.
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")


_HIGH_BYTES = bytes(range(0x80, 0x100))


class UnreadableFileError(InvalidInputError):
    """A file is binary or in an encoding kotonoha cannot tell; it was not ingested."""


@dataclass(frozen=True)
class Decoding:
    """How a file is decoded: ``encoding``, ``errors`` and what to tell the operator."""

    encoding: str
    errors: str = "strict"
    note: str = ""


@dataclass
class Discovery:
    """What :func:`discover` found: files to read, and files skipped with a reason."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def display_name(path: Path | str) -> str:
    """``path`` as valid text: undecodable name bytes become ``\\xNN`` (stable, unique)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def display_path(path: Path) -> str:
    """How a file is named in reports and as a source: relative to the working directory
    when inside it, else absolute; always valid text (:func:`display_name`)."""
    resolved = Path(os.path.abspath(path))
    try:
        name = resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        name = resolved.as_posix()
    return display_name(name)


def _inside(target: Path, root: Path) -> bool:
    try:
        target.relative_to(root)
    except ValueError:
        return False
    return True


def discover(paths: Iterable[Path]) -> Discovery:
    """Text/Markdown/PDF files under ``paths``; folders are walked without leaving them."""
    found = Discovery()
    for path in paths:
        if path.is_dir():
            _walk(path, found)
        elif path.is_file():
            found.files.append(path)
        elif path.is_symlink():
            found.skipped.append((display_path(path), "a symlink to nothing (broken link)"))
        elif path.exists():
            found.skipped.append((display_path(path), "not a regular file"))
        else:
            found.skipped.append((display_path(path), "no such file or directory"))
    return found


def _walk(root: Path, found: Discovery) -> None:
    real_root = root.resolve()

    def onerror(exc: OSError) -> None:
        where = display_path(Path(exc.filename)) if exc.filename else display_path(root)
        found.skipped.append((where, f"cannot read the folder: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            sub = here / name
            if name.startswith("."):
                dirnames.remove(name)
            elif sub.is_symlink():
                dirnames.remove(name)
                found.skipped.append((display_path(sub), "a symlinked folder (not followed)"))
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = here / name
            if p.suffix.lower() not in DOCUMENT_SUFFIXES:
                found.skipped.append(
                    (
                        display_path(p),
                        f"not a text, Markdown or PDF file ({p.suffix or 'no suffix'})",
                    )
                )
                continue
            if p.is_symlink():
                target = p.resolve()
                if not _inside(target, real_root):
                    found.skipped.append(
                        (
                            display_path(p),
                            f"a symlink to {display_path(target)}, outside {display_path(root)}",
                        )
                    )
                    continue
                if not target.is_file():
                    found.skipped.append(
                        (display_path(p), "a symlink to something that is not a file")
                    )
                    continue
            elif not p.is_file():
                found.skipped.append((display_path(p), "not a regular file"))
                continue
            found.files.append(p)


# --- encodings -------------------------------------------------------------------------


def _blocks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), BLOCK_BYTES):
            yield source[start : start + BLOCK_BYTES]
        return
    with source.open("rb") as f:
        while block := f.read(BLOCK_BYTES):
            yield block


def _decodes(path: Source, encoding: str) -> bool:
    """The whole file decodes strictly (read in blocks; nothing kept)."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    try:
        for block in _blocks(path):
            decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _broken_utf8_share(path: Source) -> float:
    """Broken bytes per non-ASCII byte when read as UTF-8."""
    broken = 0

    def count(exc: UnicodeError) -> tuple[str, int]:
        nonlocal broken
        assert isinstance(exc, UnicodeDecodeError)
        broken += exc.end - exc.start
        return "\ufffd", exc.end

    codecs.register_error("kotonoha-count", count)
    decoder = codecs.getincrementaldecoder("utf-8")("kotonoha-count")
    high = 0
    for block in _blocks(path):
        high += len(block) - len(block.translate(None, _HIGH_BYTES))
        decoder.decode(block)
    decoder.decode(b"", final=True)
    return broken / high if high else 0.0


def _japanese_score(text: str) -> int:
    score = 0
    for c in text:
        o = ord(c)
        if 0x3040 <= o <= 0x30FF or 0x4E00 <= o <= 0x9FFF or 0x3000 <= o <= 0x303F:
            score += 2
        elif 0xFF61 <= o <= 0xFF9F or 0xE000 <= o <= 0xF8FF:  # half-width kana, private use
            score -= 3
    return score


def _sample(path: Source, size: int = 256 * 1024) -> bytes:
    if isinstance(path, bytes):
        return path[:size]
    with path.open("rb") as f:
        return f.read(size)


def detect_encoding(path: Source) -> Decoding:
    """The encoding of a file (or its bytes) by the rule in the module docstring, or
    UnreadableFileError."""
    head = _sample(path)
    if not head:
        return Decoding("utf-8")
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            if not _decodes(path, encoding):
                raise UnreadableFileError(
                    f"it starts with a {encoding} byte-order mark but is not {encoding}"
                )
            note = (
                ""
                if encoding == "utf-8-sig"
                else f"decoded as {encoding.upper()} (byte-order mark)"
            )
            return Decoding(encoding, note=note)
    if b"\x1b$" in head and all(b < 0x80 for b in head) and _decodes(path, "iso2022_jp"):
        return Decoding("iso2022_jp", note="decoded as ISO-2022-JP")
    if b"\x00" in head:
        even = head[0::2].count(0) / max(1, len(head[0::2]))
        odd = head[1::2].count(0) / max(1, len(head[1::2]))
        for share_nul, share_other, encoding in (
            (odd, even, "utf-16-le"),
            (even, odd, "utf-16-be"),
        ):
            if share_nul > 0.2 and share_other < 0.02 and _decodes(path, encoding):
                return Decoding(
                    encoding, note=f"decoded as {encoding.upper()} (no byte-order mark)"
                )
        raise UnreadableFileError("a binary file (it contains NUL bytes)")
    if _decodes(path, "utf-8"):
        return Decoding("utf-8")
    # Before the legacy encodings: UTF-8 text often also "decodes" as CP932 mojibake.
    if _broken_utf8_share(path) < MAX_BROKEN_UTF8_SHARE:
        return Decoding("utf-8", "replace", note="invalid UTF-8 bytes replaced with U+FFFD")
    candidates = [e for e in ("cp932", "euc_jp") if _decodes(path, e)]
    if len(candidates) == 2:
        text = head.decode("cp932", "ignore"), head.decode("euc_jp", "ignore")
        if _japanese_score(text[1]) > _japanese_score(text[0]):
            candidates.reverse()
    if candidates:
        name = {"cp932": "Shift_JIS (CP932)", "euc_jp": "EUC-JP"}[candidates[0]]
        return Decoding(candidates[0], note=f"decoded as {name}")
    from charset_normalizer import from_bytes

    best = from_bytes(head).best()
    if best is not None and _decodes(path, best.encoding):
        return Decoding(best.encoding, note=f"decoded as {best.encoding} (a guess)")
    raise UnreadableFileError("an unknown encoding (not UTF-8, UTF-16, Shift_JIS or EUC-JP)")


# --- streaming -------------------------------------------------------------------------


@dataclass
class Segment:
    """One normalised piece of a file: its text, where it starts, its heading context."""

    text: str
    offset: int
    heading: tuple[str, ...]


@dataclass
class TextStream:
    """Segments of one file, and what reading it found (NULs, control characters)."""

    path: Source
    decoding: Decoding
    nul_replaced: int = 0
    segment_chars: int = SEGMENT_CHARS

    def segments(self) -> Generator[Segment, None, None]:
        """Normalised segments; the same file always gives the same segments."""
        offset = 0
        for raw, heading in self._raw_segments():
            text, nul = replace_nul(raw)
            self.nul_replaced += nul
            _refuse_control(text)
            norm = normalize_for_storage(text)
            if norm:
                yield Segment(norm, offset, heading)
                offset += len(norm) + 2  # segments join with a blank line

    def digest(self) -> str:
        """sha256 of the normalised text (equal to chunking's ``content_hash`` of the whole)."""
        h = hashlib.sha256()
        first = True
        nul = self.nul_replaced
        for seg in self.segments():
            if not first:
                h.update(b"\n\n")
            h.update(seg.text.encode("utf-8"))
            first = False
        self.nul_replaced = nul  # counted once, when the segments are stored
        return h.hexdigest()

    def _lines(self) -> Iterator[str]:
        """Decoded lines with universal newlines, never longer than :data:`MAX_LINE_CHARS`."""
        with (
            io.BytesIO(self.path) if isinstance(self.path, bytes) else self.path.open("rb") as raw,
            io.TextIOWrapper(
                raw, encoding=self.decoding.encoding, errors=self.decoding.errors, newline=None
            ) as text,
        ):
            while line := text.readline(MAX_LINE_CHARS):
                yield line[:-1] if line.endswith("\n") else line

    def _raw_segments(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        buf: list[str] = []
        size = 0
        fence: str | None = None
        path: list[tuple[int, str]] = []
        start_heading: tuple[str, ...] = ()
        for line in self._lines():
            probe = unicodedata.normalize("NFKC", line)
            if fence is None:
                level_title = heading_of(probe)
                cut = size >= self.segment_chars and (
                    (level_title is not None and level_title[0] == 1)
                    or (size >= 2 * self.segment_chars and not probe.strip())
                )
                if cut and buf:
                    yield "\n".join(buf), start_heading
                    buf, size = [], 0
                    start_heading = tuple(t for _, t in path)
                if level_title is not None:
                    level, title = level_title
                    path = [(lv, t) for lv, t in path if lv < level]
                    path.append((level, title))
                fence = open_fence(probe)
            elif closes_fence(probe, fence):
                fence = None
            buf.append(line)
            size += len(line) + 1
        if buf:
            yield "\n".join(buf), start_heading


def _refuse_control(text: str) -> None:
    if not text:
        return
    controls = sum(1 for _ in _CONTROL_RE.finditer(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        raise UnreadableFileError(
            f"a binary file ({controls} control characters in {len(text)} characters)"
        )


def open_text(path: Source, *, segment_chars: int = SEGMENT_CHARS) -> TextStream:
    """Detect the encoding of a file (or its bytes); the stream's segments decode it lazily."""
    return TextStream(path, detect_encoding(path), segment_chars=segment_chars)
