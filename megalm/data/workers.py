"""The per-document work of ``megalm prepare``, spread over worker processes.

Documents travel to the workers in chunks (about a megabyte of text each) and the results come back
in the order the chunks were sent, so nothing prepare does with them depends on the number of
workers or on which one was fastest. There are two kinds of work:

- :func:`scan`: clean each document (megalm.data.clean) and return what prepare needs to decide on
  it: the outcome, the content digest for de-duplication, the size, and the cleaned text when a
  tokenizer is being trained on it;
- :func:`encode`: clean each document again and tokenize it; the chunk's token ids come back as one
  numpy array with the documents' lengths, which is cheap to send.

Workers are spawned rather than forked: the parent may hold the thread pool of tokenizers (unsafe
to fork) and a large set of digests, and a spawned worker imports only what this module needs
(not webdataset, which imports torch). Each worker tokenizes on one thread; the processes are the
parallelism.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

import numpy as np
from tokenizers import Tokenizer

from megalm.data.clean import OK, Cleaner, digest
from megalm.data.tokenizer import encode as encode_texts
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import DataError

CHUNK_CHARS = 1 << 20  # a chunk ends once its bodies reach this size...
CHUNK_DOCS = 4096  # ...or this many documents: a few tenths of a second of a worker's time
T = TypeVar("T")


def chunked(items: Iterable[tuple[T, str | bytes]]) -> Iterator[list[tuple[T, str | bytes]]]:
    """``(key, body)`` pairs grouped into chunks of about CHUNK_CHARS, in order."""
    chunk: list = []
    size = 0
    for item in items:
        chunk.append(item)
        size += len(item[1])
        if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class Workers:
    """A pool of ``count`` spawned processes that clean with ``cleaner``; a context manager."""

    def __init__(self, count: int, cleaner: Cleaner):
        self.count = count
        self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start, initargs=(cleaner,))

    def map(self, task: Callable, chunks: Iterable[list[tuple[T, str | bytes]]],
            *args) -> Iterator[tuple[list[T], object]]:
        """``(keys, task(bodies, *args))`` for each chunk, in order; a few chunks per worker in flight
        keep every worker busy while bounding the memory held."""
        pending: deque = deque()
        for chunk in chunks:
            pending.append(([key for key, _ in chunk], self.pool.submit(task, [body for _, body in chunk], *args)))
            if len(pending) > 2 * self.count:
                keys, future = pending.popleft()
                yield keys, future.result()
        while pending:
            keys, future = pending.popleft()
            yield keys, future.result()

    def __str__(self) -> str:
        return f"{self.count} worker{'s' if self.count > 1 else ''}"

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------- in the workers

_cleaner: Cleaner | None = None
_tokenizer: tuple[str, Tokenizer] | None = None  # (path, tokenizer): loaded on a worker's first encode


def _start(cleaner: Cleaner) -> None:
    global _cleaner
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    _cleaner = cleaner


class Scanned(NamedTuple):
    status: str  # megalm.data.clean: OK or why the document is dropped
    digest: bytes  # of the cleaned text (empty unless OK)
    text_bytes: int
    control_removed: int
    normalized: bool
    text: str | None  # the cleaned text, when asked for (tokenizer training)


def scan(bodies: list[str | bytes], keep_text: bool) -> list[Scanned]:
    out = []
    for body in bodies:
        c = _cleaner(body)
        out.append(Scanned(c.status, digest(c.data) if c.status == OK else b"", len(c.data), c.control_removed,
                           c.normalized, c.text if keep_text else None))
    return out


def encode(bodies: list[str | bytes], tokenizer_path: str, dtype: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The chunk's token ids, each document's number of them, and each one's UTF-8 bytes of cleaned text."""
    global _tokenizer
    if _tokenizer is None or _tokenizer[0] != tokenizer_path:
        _tokenizer = (tokenizer_path, load_tokenizer(tokenizer_path))
    texts, text_bytes = [], []
    for body in bodies:
        c = _cleaner(body)
        if c.status != OK:  # the scan kept it: the same bytes must clean the same way
            raise DataError(f"a document kept by the scan now cleans to {c.status}: the source changed while "
                            f"being prepared; run `megalm prepare` again")
        texts.append(c.text)
        text_bytes.append(len(c.data))
    tokens, lengths = encode_texts(_tokenizer[1], texts, np.dtype(dtype))
    return tokens, lengths, text_bytes
