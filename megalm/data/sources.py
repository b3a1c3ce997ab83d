"""Where raw text comes from: the built-in ``python-stdlib`` corpus, a directory, or a glob.

A source yields ``(name, text)`` documents in a stable order. Files that are not valid UTF-8 are
skipped and counted (the standard library carries some on purpose, for its encoding tests), so
``prepare`` can report exactly what it left out.
"""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class DataError(RuntimeError):
    """A problem with input data (source, tokenizer, shards), reported with the file's name."""


@dataclass
class Source:
    """Documents from a list of files; ``skipped`` collects files that could not be decoded."""

    description: str
    files: list[Path]
    root: Path
    skipped: list[str] = field(default_factory=list)

    def documents(self) -> Iterator[tuple[str, str]]:
        self.skipped = []
        for path in self.files:
            name = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                self.skipped.append(f"{name} (not UTF-8)")
                continue
            except OSError as e:
                raise DataError(f"{path}: cannot read source file: {e.strerror or e}") from None
            if text.strip():
                yield name, text


def python_stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def open_source(spec: str) -> Source:
    """``python-stdlib``, a directory (every regular file below it), or a glob of files."""
    if spec == "python-stdlib":
        root = python_stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
        description = f"python-stdlib ({root})"
    elif Path(spec).is_dir():
        root = Path(spec)
        files = [p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)]
        description = f"directory {spec}"
    elif glob.has_magic(spec):
        root = Path(".")
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        description = f"glob {spec}"
    elif Path(spec).is_file():
        root = Path(spec).parent
        files = [Path(spec)]
        description = f"file {spec}"
    else:
        raise DataError(f"data.source: {spec!r} is not python-stdlib, an existing directory or file, or a glob")
    if not files:
        raise DataError(f"data.source: {spec!r} contains no files")
    return Source(description, sorted(files), root)
