"""Where a prepared dataset's files live, and getting them from there: a local directory, an
``http(s)://`` URL, or a ``pipe:`` command.

``data.dir`` names where ``index.json`` and ``tokenizer.json`` are; shards are beside them unless
``data.shards`` says otherwise (a URL prefix, or a brace pattern that lists them in index order).
A ``pipe:COMMAND`` location runs COMMAND with ``{}`` replaced by a file name and reads its standard
output (e.g. ``pipe:aws s3 cp s3://bucket/prepared/{} -``). Commands come only from what the user
wrote in a config or on the command line: file names read from ``index.json`` are checked against
a strict pattern and shell-quoted before they are put in, so a data file can never run a command.

A shard is always checked against its size and xxh3 checksum in ``index.json`` before anything of
it is used; a remote shard is spooled to a local cache file on the way (so a worker's memory does
not grow with the shard size), local shards are read in place.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

import braceexpand
import xxhash

from megalm.data.manifest import DataManifest, ShardEntry
from megalm.errors import DataError

CHUNK = 1 << 20
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HTTP_TIMEOUT_S = 60


class BadShard(DataError):
    """A shard that cannot be used: missing, unreachable, truncated, corrupt or replaced."""

    def __init__(self, url: str, problem: str):
        super().__init__(f"shard {url}: {problem}")
        self.url, self.problem = url, problem


class Location:
    """The files of one prepared dataset: ``index.json``, ``tokenizer.json`` and its shards."""

    def __init__(self, data_dir: str, shards: str = "", cache_dir: str = ""):
        self.base, self.shards = data_dir, shards
        self.cache = Path(cache_dir or Path(tempfile.gettempdir()) / f"megalm-shards-{os.getuid()}")
        self._shard_urls: dict[str, str] = {}

    @property
    def is_local(self) -> bool:
        return not self.base.startswith(("http://", "https://", "pipe:"))

    def __str__(self) -> str:
        return self.base

    # -------------------------------------------------------------------------------- naming

    def url(self, name: str) -> str:
        """Where the file ``name`` of this dataset is read from."""
        if name in self._shard_urls:
            return self._shard_urls[name]
        return self._join(self.base, name)

    @staticmethod
    def _join(base: str, name: str) -> str:
        if not SAFE_NAME.match(name):
            raise DataError(f"{base}: refusing the file name {name!r} from index.json (expected letters, digits, "
                            f"'.', '_' and '-' only); the index is not one megalm prepare wrote")
        if base.startswith("pipe:"):
            if "{}" not in base:
                raise DataError(f"data.dir: a pipe: location needs {{}} where each file name goes, got {base!r}")
            return base.replace("{}", shlex.quote(name))
        if base.startswith(("http://", "https://")):
            return base.rstrip("/") + "/" + name
        return str(Path(base) / name)

    def bind_shards(self, manifest: DataManifest) -> None:
        """Apply ``data.shards`` to the shards listed in ``manifest`` (train, then val)."""
        if not self.shards:
            return
        names = [s.name for s in manifest.train + manifest.val]
        urls = list(braceexpand.braceexpand(self.shards))
        if len(urls) > 1:  # a brace pattern: one URL per train shard
            train = [s.name for s in manifest.train]
            if len(urls) != len(train):
                raise DataError(f"data.shards: {self.shards!r} expands to {len(urls)} URLs but {self.base}/index.json "
                                f"lists {len(train)} train shards; list them all, in index order")
            self._shard_urls = dict(zip(train, urls))
        else:
            self._shard_urls = {name: self._join(self.shards, name) for name in names}

    # -------------------------------------------------------------------------------- reading

    def open(self, name: str) -> BinaryIO:
        """A stream of the file's bytes; a missing or unreachable file is a DataError naming it."""
        url = self.url(name)
        try:
            if url.startswith("pipe:"):
                return _PipeStream(url[len("pipe:"):])
            if url.startswith(("http://", "https://")):
                return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
            return open(url, "rb")
        except FileNotFoundError:
            raise BadShard(url, "missing (no such file)") from None
        except (urllib.error.URLError, OSError) as e:
            raise BadShard(url, f"unreachable ({getattr(e, 'reason', None) or e})") from None

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def local_file(self, name: str) -> Path:
        """A local path holding the file (index.json's tokenizer): itself when local, else a copy in
        the cache. A local one that is missing is a DataError naming the directory."""
        if self.is_local and name not in self._shard_urls:
            path = Path(self.url(name))
            if not path.is_file():
                raise DataError(f"{self.base}: a prepared directory without its {name} (index.json names it); put "
                                f"back the one it was prepared with, or prepare it again: megalm prepare --force "
                                f"with this data.dir and data.source")
            return path
        self.cache.mkdir(parents=True, exist_ok=True)
        dest = self.cache / f"{_safe_prefix(self.base)}-{name}"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
            with self.open(name) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            tmp.replace(dest)
        return dest

    def manifest(self) -> DataManifest:
        """The dataset's ``index.json``, read from wherever it lives."""
        if self.is_local:
            if not (Path(self.base) / DataManifest.FILE).is_file():
                raise DataError(f"{Path(self.base) / DataManifest.FILE}: not found; run `megalm prepare` for this "
                                f"data.dir first")
            manifest = DataManifest.read(self.base)
        else:
            where = self.url(DataManifest.FILE)
            try:
                raw = json.loads(self.read_bytes(DataManifest.FILE))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: not a JSON index ({e})") from None
            manifest = DataManifest.from_dict(raw, where)
        self.bind_shards(manifest)
        return manifest

    def fetch_shard(self, shard: ShardEntry, spool: Path) -> Path:
        """The shard as a local file checked against its size and checksum: the file itself when
        local, else a copy written to ``spool`` (the caller removes it). Raises BadShard."""
        url = self.url(shard.name)
        if self.is_local and shard.name not in self._shard_urls:
            path = Path(url)
            if not path.is_file():
                raise BadShard(url, "missing (no such file)")
            with open(path, "rb") as f:
                size, digest = _hash_copy(f, None)
        else:
            spool.parent.mkdir(parents=True, exist_ok=True)
            with self.open(shard.name) as src, open(spool, "wb") as out:
                try:
                    size, digest = _hash_copy(src, out)
                except (OSError, urllib.error.URLError, subprocess.CalledProcessError) as e:
                    raise BadShard(url, f"reading failed part way ({e})") from None
            path = spool
        if size != shard.bytes:
            raise BadShard(url, f"holds {size} bytes, index.json says {shard.bytes} (truncated or replaced)")
        if digest != shard.xxh3:
            raise BadShard(url, f"checksum {digest} differs from index.json's {shard.xxh3} (corrupt, or from "
                                f"another preparation or tokenizer)")
        return path


def _hash_copy(src: BinaryIO, out: BinaryIO | None) -> tuple[int, str]:
    h, size = xxhash.xxh3_64(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
    return size, h.hexdigest()


def _safe_prefix(base: str) -> str:
    return xxhash.xxh3_64_hexdigest(base.encode())[:12]


class _PipeStream:
    """The standard output of a shell command; a command that fails is an error naming it."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data or n < 0:
            self._check()
        return data

    def _check(self) -> None:
        code = self.proc.wait()
        if code != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip()[-300:]
            raise BadShard(f"pipe:{self.command}", f"the command exited with {code}: {err or 'no message'}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdout.close()
        self.proc.stderr.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
