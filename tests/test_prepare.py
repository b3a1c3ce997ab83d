"""megalm prepare: every source format, the cleaning rules and their counts, output that is the same
byte for byte for any number of workers, resuming an interrupted prepare, checksums in index.json,
and ensure_prepared taking a prepared directory as it is."""

import gzip
import io
import json
import re
import shutil
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
import zstandard

from megalm.config import DataConfig
from megalm.data import prepare as prepare_module
from megalm.data import workers
from megalm.data.clean import EMPTY, NOT_UTF8, OK, TOO_SHORT, Cleaner
from megalm.data.manifest import CleaningCounts, DataManifest, read_done_shards
from megalm.data.prepare import ensure_prepared, prepare
from megalm.data.sources import open_source, python_stdlib_root
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import DataError

MODULES = ["textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py", "glob.py", "keyword.py",
           "stat.py", "numbers.py", "abc.py", "copy.py", "queue.py", "sched.py", "getopt.py", "base64.py"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Standard-library modules prepared by one worker, training the tokenizer: what every other
    preparation of them must equal byte for byte."""
    root = tmp_path_factory.mktemp("prepare")
    (root / "corpus").mkdir()
    for name in MODULES:
        shutil.copy(python_stdlib_root() / name, root / "corpus" / name)
    cfg = DataConfig(source=str(root / "corpus"), dir=str(root / "one"), vocab_size=400, shard_tokens=6000,
                     val_fraction=0.15, prepare_workers=1)
    return cfg, prepare(cfg)


def files(data_dir) -> dict[str, bytes]:
    """Every file of a prepared directory; index.json without the one field that may differ."""
    out = {p.name: p.read_bytes() for p in Path(data_dir).iterdir()}
    index = json.loads(out.pop("index.json"))
    del index["prepare_seconds"]
    return {**out, "index.json": json.dumps(index).encode()}


def documents(data_dir, entries) -> list[np.ndarray]:
    docs = []
    for entry in entries:
        with tarfile.open(Path(data_dir) / entry.name) as tar:
            docs += [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar]
    return docs


def test_every_source_format_yields_its_documents(tmp_path):
    rows = [{"text": "first document", "id": 1}, {"text": "zweites Dokument: Grüße"}, {"text": None},
            {"text": "a\nb"}]
    texts = ["first document", "zweites Dokument: Grüße", "", "a\nb"]  # a null text is an empty document
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(lines + "\n")  # blank lines are not documents
    with gzip.open(mixed / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    data = lines.encode()  # in two zstd frames, the second starting inside a line
    (mixed / "c.jsonl.zst").write_bytes(zstandard.compress(data[:30]) + zstandard.compress(data[30:]))
    pq.write_table(pa.table({"n": [1, 2, 3, 4], "text": [r["text"] for r in rows]}), mixed / "d.parquet",
                   row_group_size=3)
    (mixed / "e.txt").write_text("plain text\n")
    (mixed / ".hidden").write_text("not read")
    source = open_source(str(mixed))
    docs = list(source.documents())
    assert [n for n, _ in docs] == ([f"a.jsonl:{i}" for i in (1, 2, 3, 4)] + [f"b.jsonl.gz:{i}" for i in (1, 2, 3, 4)]
                                    + [f"c.jsonl.zst:{i}" for i in (1, 2, 3, 4)] + [f"d.parquet:{i}" for i in range(4)]
                                    + ["e.txt"])
    assert [body for _, body in docs] == texts * 4 + [b"plain text\n"]  # text files are decoded when cleaned
    assert source.bytes_done == source.total_bytes
    # one file alone, and another text field
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x y z"}) + "\n")
    other = open_source(str(tmp_path / "other.jsonl"), text_field="body")
    assert list(other.documents()) == [("other.jsonl:1", "x y z")]


def test_hugging_face_dataset_saved_to_disk(tmp_path, monkeypatch):
    fake = tmp_path / "fake"  # how a saved dataset is recognized; reading it needs the package
    fake.mkdir()
    (fake / "dataset_info.json").write_text("{}")
    (fake / "state.json").write_text("{}")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "datasets", None)
        with pytest.raises(DataError, match=f"{fake}: is a Hugging Face dataset .* pip install datasets"):
            list(open_source(str(fake)).documents())

    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed (pip install datasets)")
    datasets.disable_progress_bars()
    one = datasets.Dataset.from_dict({"id": [7, 8, 9], "content": ["alpha", None, "gamma"]})
    one.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": one, "test": one.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert list(open_source(str(tmp_path / "one"), "content").documents()) == [
        ("0", "alpha"), ("1", ""), ("2", "gamma")]
    assert list(open_source(str(tmp_path / "dict"), "content").documents()) == [
        ("train:0", "alpha"), ("train:1", ""), ("train:2", "gamma"), ("test:0", "gamma")]
    with pytest.raises(DataError, match=r"one: no column 'text' \(columns: id, content\); set data.text_field"):
        list(open_source(str(tmp_path / "one")).documents())


def test_bad_input_is_named_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"

    def error(content: str, text_field: str = "text") -> str:
        bad.write_text(content)
        with pytest.raises(DataError) as e:
            list(open_source(str(bad), text_field).documents())
        return str(e.value)

    assert error('{"text": "fine"}\n\n{"text": oops}\n') == f"{bad}:3: not valid JSON (Expecting value at column 10)"
    assert error('{"text": "fine"}\n{"body": "x", "id": 2}\n') == (
        f"{bad}:2: expected a JSON object with the text in 'text' (fields: body, id); set data.text_field")
    assert error('["text"]\n') == f"{bad}:1: expected a JSON object with the text in 'text' (list); set data.text_field"
    assert error('{"text": 5}\n') == f"{bad}:1: 'text' holds int, expected a string"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"{bad}:1: not valid UTF-8"):
        list(open_source(str(bad)).documents())
    for name, compress in (("cut.jsonl.gz", gzip.compress), ("cut.jsonl.zst", zstandard.compress)):
        cut = tmp_path / name  # a compressed file cut short
        data = compress("".join(json.dumps({"text": f"line {i * i}"}) + "\n" for i in range(1000)).encode())
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=f"{cut}: cannot read"):
            list(open_source(str(cut)).documents())
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), table)
    with pytest.raises(DataError, match=re.escape(f"{table}: no column 'text' (columns: body); set data.text_field")):
        list(open_source(str(table)).documents())
    pq.write_table(pa.table({"text": [1]}), table)
    with pytest.raises(DataError, match=re.escape(f"{table}: column 'text' holds int64, expected strings")):
        list(open_source(str(table)).documents())
    # through prepare the error comes from the scan, in the worker pool, unchanged
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=f"{bad}:2: expected a JSON object"):
        prepare(DataConfig(source=str(bad), dir=str(tmp_path / "out"), prepare_workers=1))
    assert not (tmp_path / ".out.tmp").exists()  # a scan that failed leaves nothing behind


def test_cleaning_rules():
    clean = Cleaner("NFC", min_chars=5)
    assert clean("e\u0301te\u0301 ok")[:2] == (OK, "\u00e9t\u00e9 ok") and clean("e\u0301te\u0301 ok").normalized
    assert clean("\ufb01ne print").text == "\ufb01ne print"  # NFC keeps the ligature, NFKC folds it
    assert Cleaner("NFKC", 1)("\ufb01ne print").text == "fine print"
    assert Cleaner("none", 1)("e\u0301").text == "e\u0301"
    # control characters go, except tab, newline, carriage return and form feed
    cleaned = clean("a\x00b\x1b[0mc\x0cd\te\r\n\x85f\x7f")
    assert (cleaned.text, cleaned.control_removed) == ("ab[0mc\x0cd\te\r\nf", 4)
    assert cleaned.data == cleaned.text.encode()
    assert clean(b"caf\xe9 au lait").status == NOT_UTF8
    assert clean("lone \ud800 surrogate").status == NOT_UTF8
    assert clean(" \n\t\x00 ").status == EMPTY
    assert clean("abcd").status == TOO_SHORT and clean("abcde").status == OK


def test_cleaning_counts_are_exact(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = ["alpha document one", "alpha document one",  # a duplicate
            "e\u0301 accent here",  # normalized
            "\u00e9 accent here", "e\u0301 accent here",  # duplicates once normalized
            "tiny",  # too short
            "   \n ",  # empty
            "bell\x07 and \x00 nul here",  # 2 control characters
            "beta document two", "gamma document three"]
    (corpus / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (corpus / "zlatin1.txt").write_bytes(b"caf\xe9 au lait")  # not UTF-8
    cfg = DataConfig(source=str(corpus), dir=str(tmp_path / "out"), vocab_size=300, min_chars=5, val_fraction=0.3,
                     prepare_workers=1)
    index = prepare(cfg)
    assert index.cleaning == CleaningCounts(documents_in=11, not_utf8=1, empty=1, too_short=1, duplicates=3,
                                            documents_out=5, normalized=1, control_chars_removed=2)
    assert index.documents == 5 and index.skipped == ["zlatin1.txt (not UTF-8)"]
    assert DataManifest.read(cfg.dir) == index
    tok = load_tokenizer(Path(cfg.dir) / "tokenizer.json")
    texts = [tok.decode(d.tolist()) for d in documents(cfg.dir, index.train + index.val)]
    assert sorted(texts) == sorted(["alpha document one", "\u00e9 accent here", "bell and  nul here",
                                    "beta document two", "gamma document three"])


def test_output_is_the_same_for_any_number_of_workers(reference, tmp_path, monkeypatch):
    cfg, one = reference
    assert len(one.train) >= 4 and len(one.val) >= 1 and one.documents == len(MODULES)
    assert DataManifest.read(cfg.dir) == one
    for entry in one.train + one.val:  # index.json holds every shard's size and checksum
        data = (Path(cfg.dir) / entry.name).read_bytes()
        assert (entry.bytes, entry.xxh3) == (len(data), xxhash.xxh3_64_hexdigest(data))
    with tarfile.open(Path(cfg.dir) / one.train[0].name) as tar:
        assert {(m.mtime, m.uname) for m in tar} == {(0, "bigdata")}  # nothing of the time or the machine
    docs = documents(cfg.dir, one.train)
    assert [len(d) for d in docs] and sum(map(len, docs)) == one.train_tokens - len(docs)  # + end-of-text each
    # two workers, and chunks small enough that they interleave; through ensure_prepared, which
    # prepares a data.dir that has no index.json
    monkeypatch.setattr(workers, "CHUNK_CHARS", 20_000)
    two = ensure_prepared(replace(cfg, dir=str(tmp_path / "two"), prepare_workers=2))
    assert two == replace(one, prepare_seconds=two.prepare_seconds)
    assert files(tmp_path / "two") == files(cfg.dir)


class Interrupted(Exception):
    pass


def test_interrupted_prepare_resumes_where_it_stopped(reference, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    cfg, one = reference
    cfg = replace(cfg, dir=str(tmp_path / "out"))
    tmp = tmp_path / ".out.tmp"
    record = prepare_module._Shards._record

    def stop_after(n):
        def interrupted(self, shard, docs):
            if len(self.done) == n:
                raise Interrupted
            record(self, shard, docs)
        return interrupted

    with monkeypatch.context() as m:
        m.setattr(prepare_module._Shards, "_record", stop_after(3))
        with pytest.raises(Interrupted):
            prepare(cfg)
    assert not Path(cfg.dir).exists()
    first = read_done_shards(tmp)
    assert len(first) == 3
    # a shard that no longer matches its checksum is written again, and so are the later ones of its split
    bad = tmp / first[0].entry.name
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    assert any(s.split == first[0].split for s in first[1:])  # a good shard after it, written again too
    kept = [s.entry.name for s in first[1:] if s.split != first[0].split]
    with open(tmp / "shards.jsonl", "a") as f:
        f.write('{"split": "train", "entry": {"na')  # a crash while a shard was being added
    written = []
    close = prepare_module._Split.close

    def spy(self, end):
        closed = close(self, end)
        written.append(closed[0].entry.name)
        return closed

    monkeypatch.setattr(prepare_module._Split, "close", spy)
    caplog.clear()
    again = prepare(cfg)
    assert sorted(written) == sorted(e.name for e in one.train + one.val if e.name not in kept)
    assert f"{bad}: checksum differs" in caplog.text
    assert f"resuming the preparation in {tmp}: {len(kept)} of its shards" in caplog.text
    assert "scanning" not in caplog.text  # the scan's outcome and the tokenizer it trained are reused
    assert again == replace(one, prepare_seconds=again.prepare_seconds)
    assert files(cfg.dir) == files(reference[0].dir) and not tmp.exists()

    # an unfinished preparation with other settings is discarded, with a word in the log
    other = replace(cfg, dir=str(tmp_path / "other"))
    with monkeypatch.context() as m:
        m.setattr(prepare_module._Shards, "_record", stop_after(1))
        with pytest.raises(Interrupted):
            prepare(other)
    written.clear()
    changed = prepare(replace(other, shard_tokens=50_000))
    assert "discarding the unfinished preparation" in caplog.text
    assert "data.shard_tokens=50000 here, 6000 there" in caplog.text
    assert written == [e.name for e in changed.train + changed.val]


def test_ensure_prepared_takes_a_prepared_dir_as_it_is(reference, caplog):
    cfg, one = reference
    elsewhere = DataConfig(dir=cfg.dir, source="python-stdlib", vocab_size=999, normalize="NFKC", dedup=False)
    caplog.set_level("INFO")
    assert ensure_prepared(elsewhere) == one
    assert f"was prepared from {one.source}: vocab {one.vocab_size}, tokenizer {one.tokenizer_hash[:12]}" in caplog.text
    with pytest.raises(DataError, match="already holds data prepared with other settings"):
        prepare(elsewhere)


def test_prepare_with_a_given_tokenizer_and_bad_ones(reference, tmp_path):
    cfg, index = reference
    again = prepare(replace(cfg, dir=str(tmp_path / "again"), tokenizer=f"{cfg.dir}/tokenizer.json", vocab_size=999))
    assert again.documents == index.documents and again.vocab_size == index.vocab_size
    assert again.train_tokens == index.train_tokens and again.tokenizer_hash == index.tokenizer_hash
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    with pytest.raises(DataError, match="not a valid HF tokenizers file"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match="is not python-stdlib, an existing directory"):
        prepare(DataConfig(source=str(tmp_path / "missing"), dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_prepare_cli_reports_errors_in_one_line(tmp_path):
    from tests.helpers import run_megalm

    proc = run_megalm("prepare", "--force", f"data.source={tmp_path}/nothing", f"data.dir={tmp_path}/out", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("megalm: error: data.source:")
    assert "Traceback" not in proc.stderr


def test_manifest_versions_and_fields_are_checked(reference, tmp_path):
    cfg, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(cfg.dir, copy)
    raw = json.loads((copy / "index.json").read_text())
    cases = [
        ({**raw, "version": 99}, rf"version 99 is newer than this megalm reads \({DataManifest.VERSION}\); upgrade"),
        ({k: v for k, v in raw.items() if k != "version"}, "no version field"),
        ({**raw, "train": [{**raw["train"][0], "samples": "many"}]}, r"train\[0\].samples: expected int"),
        ({**raw, "shards": []}, r"unknown fields \['shards'\]"),
    ]
    for bad, message in cases:
        (copy / "index.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=f"{copy / 'index.json'}: .*{message}.*megalm prepare --force"):
            DataManifest.read(copy)
