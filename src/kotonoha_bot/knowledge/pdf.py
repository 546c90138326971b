"""Text out of PDF files, through pypdf (pure Python, no system libraries).

Only the text layer is read: a scanned PDF without one gives no text and is refused
with that reason (there is no OCR here). Encrypted files are tried with the empty
password, which opens the common "owner password only" case; anything else is a
typed, one-line ``InvalidInputError`` naming the file, never a pypdf traceback.
"""

from __future__ import annotations

import io
import logging

from kotonoha_bot.errors import InvalidInputError

log = logging.getLogger("kotonoha_bot.knowledge")

#: Pages read at most (a longer PDF is refused rather than cut silently).
MAX_PDF_PAGES = 2000


def pdf_text(data: bytes, name: str) -> str:
    """The text of every page, pages separated by a blank line."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:  # pragma: no cover - pypdf is a dependency
        raise InvalidInputError(f"{name}: PDF support needs the pypdf package") from None
    if not data.startswith(b"%PDF-"):
        raise InvalidInputError(f"{name}: not a PDF file (no %PDF- header)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidInputError(f"{name}: the PDF is password-protected")
        if len(reader.pages) > MAX_PDF_PAGES:
            raise InvalidInputError(
                f"{name}: {len(reader.pages)} pages, at most {MAX_PDF_PAGES} are read"
            )
        pages = [page.extract_text() or "" for page in reader.pages]
    except InvalidInputError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidInputError(f"{name}: not a readable PDF ({type(exc).__name__})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise InvalidInputError(
            f"{name}: the PDF has no text layer (a scan?); only text PDFs can be read"
        )
    return text
