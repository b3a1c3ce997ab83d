"""Cleaning one document before it is tokenized: the same rules in prepare's scan and when it writes shards.

In order:

1. A body of bytes (a text file, a binary column) is decoded as UTF-8. One that is not UTF-8, or a
   string holding lone surrogates (JSON allows ``"\\ud800"``), is dropped: ``not_utf8``.
2. Unicode normalization, ``data.normalize``: NFC (the default; composes characters, changes no
   meaning), NFKC (also folds compatibility forms: full-width letters, ligatures, superscripts), or none.
3. Control characters (Unicode category Cc: C0, DEL, C1) are removed, except tab, line feed,
   carriage return and form feed. Form feed stays because source code uses it as a page break (the
   Python standard library does) and a tokenizer treats it as whitespace; the others are binary
   debris, or C1 codes left by text decoded with the wrong code page.
4. A document with nothing but whitespace left is dropped (``empty``); one shorter than
   ``data.min_chars`` characters is dropped (``too_short``). Whitespace is otherwise kept as it is:
   indentation is part of code.

Exact duplicates are found by :func:`digest` of the cleaned text; which copy is kept (the first in
source order) needs every earlier document, so ``prepare`` decides that.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

OK, NOT_UTF8, EMPTY, TOO_SHORT = "ok", "not_utf8", "empty", "too_short"
CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # Cc without \t \n \x0c (form feed) \r


class Cleaned(NamedTuple):
    status: str  # OK, or why the document is dropped
    text: str | None  # the cleaned text (None unless OK)
    data: bytes  # its UTF-8 encoding (empty unless OK)
    control_removed: int  # control characters removed
    normalized: bool  # whether normalization changed the text


@dataclass(frozen=True)
class Cleaner:
    normalize: str  # NFC, NFKC or none
    min_chars: int

    def __call__(self, body: str | bytes) -> Cleaned:
        try:
            text = body.decode("utf-8") if isinstance(body, bytes) else body
        except UnicodeDecodeError:
            return Cleaned(NOT_UTF8, None, b"", 0, False)
        normalized = False
        if self.normalize != "none":
            before, text = text, unicodedata.normalize(self.normalize, text)
            normalized = text is not before and text != before
        text, removed = CONTROL.subn("", text)
        if not text.strip():
            return Cleaned(EMPTY, None, b"", removed, normalized)
        if len(text) < self.min_chars:
            return Cleaned(TOO_SHORT, None, b"", removed, normalized)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not text any tokenizer can take
            return Cleaned(NOT_UTF8, None, b"", removed, normalized)
        return Cleaned(OK, text, data, removed, normalized)


def digest(data: bytes) -> bytes:
    """The identity of a cleaned text for exact de-duplication (128 bits: no accidental collisions)."""
    return hashlib.blake2b(data, digest_size=16).digest()
