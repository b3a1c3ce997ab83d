"""Where raw text comes from (``data.source``), read as a stream of documents in a stable order.

A source is ``python-stdlib`` (the ``.py`` files of this Python's standard library), a directory
(every regular, non-hidden file below it), a glob, one file, or a Hugging Face dataset saved with
``save_to_disk`` (a directory holding ``dataset_info.json`` and ``state.json``, or
``dataset_dict.json``; every split in order). Files are read by their extension, so a directory
may mix formats:

- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, the text in ``data.text_field``;
- ``.parquet``: the column ``data.text_field``, read one batch of rows at a time;
- anything else: one document of UTF-8 text.

A document is ``(name, body)``. The name identifies it for the train/validation split: the file's
path below the source root, plus ``:LINE`` for a jsonl line (from 1) or ``:ROW`` for a parquet or
dataset row (from 0). The body is the raw ``bytes`` of a text file (or a binary column), decoded
by the cleaning step so that files which are not UTF-8 are counted there, or the ``str`` of a
row; a null text is an empty document. Input that cannot be read as its format says is a
DataError naming the file and line or row.

The readers' libraries (zstandard, pyarrow, datasets) are imported when a file needs them.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from megalm.errors import DataError

Document = tuple[str, str | bytes]
ROWS_PER_BATCH = 1024


def python_stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_hf_dataset(path: Path) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (one dataset, or a dict of splits)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


class Source:
    """The documents of ``files`` (below ``root``); ``bytes_done`` follows reading for progress."""

    def __init__(self, description: str, root: Path, files: list[Path], text_field: str, hf_dataset: bool = False):
        self.description, self.root, self.files = description, root, files
        self.text_field, self.hf_dataset = text_field, hf_dataset
        self.total_bytes = sum(p.stat().st_size for p in files)
        self.bytes_done = 0  # of total_bytes, as read so far (compressed bytes for compressed files)

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the files: a resumed preparation must see the same input."""
        h = hashlib.blake2b(digest_size=16)
        for path in self.files:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def documents(self) -> Iterator[Document]:
        self.bytes_done = 0
        if self.hf_dataset:
            yield from self._hf_dataset()
            return
        for path in self.files:
            done = self.bytes_done
            name = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
            if path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
                yield from self._jsonl(path, name, done)
            elif path.name.endswith(".parquet"):
                yield from self._parquet(path, name, done)
            else:
                try:
                    body = path.read_bytes()
                except OSError as e:
                    raise DataError(f"{path}: cannot read source file: {e.strerror or e}") from None
                yield name, body
            self.bytes_done = done + path.stat().st_size

    def _jsonl(self, path: Path, name: str, done: int) -> Iterator[Document]:
        field = self.text_field
        with _open_binary(path) as raw:
            lines, errors = _decompressed(path, raw)
            try:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                    except UnicodeDecodeError:
                        raise DataError(f"{where}: not valid UTF-8") from None
                    if not isinstance(row, dict) or field not in row:
                        keys = f"fields: {', '.join(list(row)[:8])}" if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"{where}: expected a JSON object with the text in {field!r} ({keys}); "
                                        f"set data.text_field")
                    yield f"{name}:{number}", _text(row[field], where, field)
                    self.bytes_done = done + raw.tell()
            except errors as e:
                raise DataError(f"{path}: cannot read ({e})") from None

    def _parquet(self, path: Path, name: str, done: int) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        field = self.text_field
        with _open_binary(path) as raw:
            try:
                table = pq.ParquetFile(raw)
                schema = table.schema_arrow
                if field not in schema.names:
                    raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names[:8])}); "
                                    f"set data.text_field")
                _check_text_type(schema.field(field).type, f"{path}: column {field!r}")
                row = 0
                for batch in table.iter_batches(batch_size=ROWS_PER_BATCH, columns=[field]):
                    for value in batch.column(0).to_pylist():
                        yield f"{name}:{row}", _text(value, f"{path}: row {row}", field)
                        row += 1
                    self.bytes_done = done + raw.tell()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: not a readable parquet file ({e})") from None

    def _hf_dataset(self) -> Iterator[Document]:
        try:
            import datasets  # optional, and slow to import
        except ImportError:
            raise DataError(f"{self.root}: is a Hugging Face dataset saved to disk; reading it needs the "
                            f"`datasets` package: pip install datasets") from None
        field = self.text_field
        try:
            loaded = datasets.load_from_disk(str(self.root))
        except Exception as e:  # datasets raises assorted types for a damaged directory
            raise DataError(f"{self.root}: cannot load the saved dataset ({type(e).__name__}: {e})") from None
        splits = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
        rows_total = sum(len(d) for _, d in splits) or 1
        rows_done = 0
        for split, dataset in splits:
            where = f"{self.root}/{split}" if split else str(self.root)
            if field not in dataset.column_names:
                raise DataError(f"{where}: no column {field!r} (columns: {', '.join(dataset.column_names[:8])}); "
                                f"set data.text_field")
            _check_text_type(dataset.data.schema.field(field).type, f"{where}: column {field!r}")
            prefix = f"{split}:" if split else ""
            row = 0
            for batch in dataset.select_columns([field]).iter(batch_size=ROWS_PER_BATCH):
                for value in batch[field]:
                    yield f"{prefix}{row}", _text(value, f"{where}: row {row}", field)
                    row += 1
                rows_done += len(batch[field])
                self.bytes_done = self.total_bytes * rows_done // rows_total


def _decompressed(path: Path, raw: BinaryIO) -> tuple[Iterable[bytes], tuple[type[Exception], ...]]:
    """A jsonl file's lines, and the errors that reading a corrupt or truncated one raises."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), (OSError, EOFError)
    if path.name.endswith(".zst"):
        import zstandard

        return _zstd_lines(raw, zstandard.ZstdDecompressor()), (OSError, EOFError, zstandard.ZstdError)
    return raw, (OSError,)


def _zstd_lines(raw: BinaryIO, decompressor) -> Iterator[bytes]:
    """The lines of every frame of a zstd stream. (zstandard's stream reader takes a file cut short
    inside a frame for its end: this raises EOFError instead.)"""
    frame, fed, rest = decompressor.decompressobj(), False, b""
    while block := raw.read(1 << 20):
        while block:
            rest += frame.decompress(block)
            fed, block = True, b""
            if frame.eof:  # the next frame starts in what is left of this block
                frame, fed, block = decompressor.decompressobj(), False, frame.unused_data
        *lines, rest = rest.split(b"\n")
        yield from lines
    if fed and not frame.eof:
        raise EOFError("the file ends inside a zstd frame (truncated)")
    if rest:
        yield rest


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read source file: {e.strerror or e}") from None


def _text(value, where: str, field: str) -> str | bytes:
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)):
        raise DataError(f"{where}: {field!r} holds {type(value).__name__}, expected a string")
    return value


def _check_text_type(arrow_type, where: str) -> None:
    import pyarrow as pa

    if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)):
        raise DataError(f"{where} holds {arrow_type}, expected strings; set data.text_field")


def open_source(spec: str, text_field: str = "text") -> Source:
    """``python-stdlib``, a saved Hugging Face dataset, a directory, a glob of files, or one file."""
    path = Path(spec)
    if spec == "python-stdlib":
        root = python_stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
        description = f"python-stdlib ({root})"
    elif path.is_dir() and is_hf_dataset(path):
        files = [p for p in path.rglob("*") if p.is_file()]
        return Source(f"Hugging Face dataset {spec}", path, sorted(files), text_field, hf_dataset=True)
    elif path.is_dir():
        root = path
        files = [p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)]
        description = f"directory {spec}"
    elif glob.has_magic(spec):
        root = Path(".")
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        description = f"glob {spec}"
    elif path.is_file():
        root = path.parent
        files = [path]
        description = f"file {spec}"
    else:
        raise DataError(f"data.source: {spec!r} is not python-stdlib, an existing directory or file, or a glob")
    if not files:
        raise DataError(f"data.source: {spec!r} contains no files")
    return Source(description, root, sorted(files), text_field)
