"""Names every layer of megalm shares, at the bottom of its imports (with megalm.errors): what a
label that does not count is, what pads a text, and how a file's checksum is taken."""

from __future__ import annotations

from pathlib import Path

import xxhash

IGNORE = -100  # the label of a position (or a row) that does not count: padding, unmasked, skipped
PAD = -1  # the token id of the padding after a labelled text's end (never a real token)
CHUNK = 16 << 20  # bytes per read or write of a large file (and per checksum update)


def checksum(path: Path) -> str:
    """The xxh3-64 of a file's bytes (hex), as index.json and a checkpoint's meta.json record them."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
