"""Records on disk: each JSON file megalm writes for later runs is one versioned dataclass.

A record class (the data manifest ``index.json``, a checkpoint's ``meta.json``) subclasses
:class:`Record`, names its file and the error type of its domain, and gets ``write`` (atomic:
a temporary file, fsynced, then renamed) and ``read`` (typed: every field converted to its
declared type, unknown keys refused). The ``version`` field says which layout of the record a
file holds: a missing, unknown or newer version is a one-line error naming the file, never a
``KeyError`` three modules later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar


class Record:
    """Base of the versioned records. Subclasses are dataclasses with a ``version: int`` field."""

    FILE: ClassVar[str]  # the file name inside its directory
    VERSION: ClassVar[int]  # the version this megalm writes and reads
    ERROR: ClassVar[type[Exception]] = ValueError  # the domain's error type (DataError, CheckpointError)
    REMEDY: ClassVar[str] = ""  # what the user can do about an unreadable file, appended to errors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path):
        path = Path(directory) / cls.FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise cls._error(f"{path}: not found") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise cls._error(f"{path}: unreadable ({e})") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise cls._error(f"{where}: expected a JSON object")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise cls._error(f"{where}: no version field (written by an older megalm, or not by megalm)")
        if version > cls.VERSION:
            raise cls._error(f"{where}: version {version} is newer than this megalm reads "
                             f"({cls.VERSION}); upgrade megalm")
        if version != cls.VERSION:
            raise cls._error(f"{where}: version {version} is no longer read (this megalm reads "
                             f"version {cls.VERSION})")
        try:
            return _convert(cls, raw, "")
        except _FieldError as e:
            raise cls._error(f"{where}: {e}") from None

    @classmethod
    def _error(cls, message: str) -> Exception:
        return cls.ERROR(f"{message}; {cls.REMEDY}" if cls.REMEDY else message)


class _FieldError(ValueError):
    pass


def _convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses, lists, dicts, optionals, scalars."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _FieldError(f"{path or 'record'}: expected an object, got {value!r:.60}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - set(fields)
        if unknown:
            raise _FieldError(f"{path or 'record'}: unknown fields {sorted(unknown)}")
        missing = [n for n, f in fields.items() if n not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise _FieldError(f"{path or 'record'}: missing fields {missing}")
        return tp(**{k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _FieldError(f"{path}: expected a list, got {value!r:.60}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _FieldError(f"{path}: expected an object, got {value!r:.60}")
        return {k: _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any or tp is dict:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise _FieldError(f"{path}: expected {tp.__name__}, got {value!r:.60}")
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
