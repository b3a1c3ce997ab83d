"""Data: prepare (tokenizer, shards, manifest), streaming that is the same for any DP size and
resumes exactly, and clear errors for bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from megalm.config import DataConfig
from megalm.data.loader import TrainLoader, validation_sequences
from megalm.data.manifest import DataManifest
from megalm.data.prepare import prepare
from megalm.data.sources import DataError
from megalm.data.tokenizer import load_tokenizer
from tests.helpers import make_corpus, run_megalm


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = DataConfig(source=str(make_corpus(root / "corpus")), dir=str(root / "prepared"), vocab_size=512,
                     shard_tokens=4000, streams=4, val_fraction=0.1)
    return cfg, prepare(cfg)


def loader(cfg, index, rank=0, dp=1, mbs=8, accum=1, workers=0, state=None, seq_len=32):
    it = TrainLoader(cfg.dir, index, seq_len=seq_len, streams=cfg.streams, dp_rank=rank, dp_size=dp, dp_group=None,
                     micro_batch_size=mbs, grad_accum=accum, num_workers=workers, seed=3)
    if state is not None:
        it.load_state_dict(state)
    return it


def test_prepare_writes_tokenizer_shards_and_manifest(prepared):
    cfg, index = prepared
    files = sorted(p.name for p in __import__("pathlib").Path(cfg.dir).iterdir())
    assert "index.json" in files and "tokenizer.json" in files
    assert len(index.train) >= cfg.streams and len(index.val) >= 1
    assert index.documents == 24 and index.skipped == []
    tok = load_tokenizer(f"{cfg.dir}/tokenizer.json")
    assert tok.get_vocab_size() == 512 == index.vocab_size
    assert tok.decode(tok.encode("def f(x):\n    return x").ids) == "def f(x):\n    return x"
    assert sum(s.tokens for s in index.train) == index.train_tokens - sum(s.samples for s in index.train)
    assert 0 < index.unigram_entropy_nats < np.log(512)
    assert DataManifest.read(cfg.dir) == index  # the record reads back to what was written
    # the same settings again reuse the directory; different settings are refused
    assert prepare(cfg) == index
    with pytest.raises(DataError, match="already holds data prepared with other settings"):
        prepare(DataConfig(**{**cfg.__dict__, "vocab_size": 600}))


def test_every_token_of_a_stream_arrives_once_in_order(prepared):
    cfg, index = prepared
    it = loader(cfg, index, mbs=4)  # 4 streams, 1 sequence each per step
    seqs = torch.cat([torch.cat(next(it)) for _ in range(40)])
    stream0 = seqs[0::4].flatten().numpy()
    # rebuild stream 0's token sequence straight from the shards it owns
    first = it._streams[0]
    expected = np.concatenate([d for slot in range(len(first.shards)) for d in first._documents(0, slot)])
    n = min(len(stream0), len(expected))
    assert n > 500
    np.testing.assert_array_equal(stream0[:n], expected[:n])


def test_global_batch_is_the_same_for_any_dp_size_and_workers(prepared):
    cfg, index = prepared
    single = loader(cfg, index, mbs=8)
    ranks = [loader(cfg, index, rank=r, dp=2, mbs=2, accum=2, workers=2 if r else 0) for r in range(2)]
    for _ in range(6):
        whole = torch.cat(next(single))
        parts = [torch.cat(next(r)) for r in ranks]
        # rank r owns streams r, r+2: rows of the one-process batch in stream order
        per_stream = whole.view(4, 2, -1)
        torch.testing.assert_close(parts[0], per_stream[[0, 2]].flatten(0, 1))
        torch.testing.assert_close(parts[1], per_stream[[1, 3]].flatten(0, 1))


def test_resume_is_exact_even_on_another_dp_size(prepared):
    cfg, index = prepared
    ref = loader(cfg, index, mbs=8, seq_len=512)
    reference = [torch.cat(next(ref)) for _ in range(60)]  # runs into a second epoch of every stream
    first = [loader(cfg, index, rank=r, dp=2, mbs=4, seq_len=512) for r in range(2)]
    for _ in range(12):
        for r in first:
            next(r)
    positions = {k: v for r in first for k, v in r.local_positions().items()}  # what state_dict gathers
    state = json.loads(json.dumps({"streams": cfg.streams, "positions": positions}))  # as in a checkpoint
    resumed = loader(cfg, index, mbs=8, state=state, seq_len=512)
    for step in range(12, 60):
        torch.testing.assert_close(torch.cat(next(resumed)), reference[step])
    assert all(p.epoch > 0 for p in ref.positions.values())


def test_validation_sequences_are_fixed(prepared):
    cfg, index = prepared
    a = validation_sequences(cfg.dir, index, 32, 8)
    assert a.shape == (8, 33)
    torch.testing.assert_close(a, validation_sequences(cfg.dir, index, 32, 8))


def test_corrupt_or_truncated_shard_is_named(prepared, tmp_path):
    cfg, index = prepared
    copy = tmp_path / "copy"
    shutil.copytree(cfg.dir, copy)
    shard = copy / index.train[0].name
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    it = loader(DataConfig(**{**cfg.__dict__, "dir": str(copy)}), index, mbs=4, seq_len=512)
    with pytest.raises(DataError, match=f"shard {shard}: unreadable"):
        for _ in range(100):  # more than an epoch of stream 0
            next(it)


def test_bad_sources_and_tokenizer(tmp_path):
    with pytest.raises(DataError, match="is not python-stdlib, an existing directory"):
        prepare(DataConfig(source=str(tmp_path / "missing"), dir=str(tmp_path / "out")))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty UTF-8 text files"):
        prepare(DataConfig(source=str(empty), dir=str(tmp_path / "out")))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    with pytest.raises(DataError, match="not a valid HF tokenizers file"):
        load_tokenizer(bad)
    assert not (tmp_path / "out").exists()


def test_prepare_cli_reports_errors_without_traceback(tmp_path):
    proc = run_megalm("prepare", "--force", f"data.source={tmp_path}/nothing", f"data.dir={tmp_path}/out", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("megalm: error: data.source:")
    assert "Traceback" not in proc.stderr


def test_sources_directory_glob_and_stdlib(tmp_path):
    from megalm.data.sources import open_source

    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "notes.txt").write_text("plain text counts too\n")
    (corpus / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    directory = open_source(str(corpus))
    assert len(directory.files) == 26
    docs = dict(directory.documents())
    assert "notes.txt" in docs and "latin1.py" not in docs
    assert directory.skipped == ["latin1.py (not UTF-8)"]  # counted and named, never silently dropped
    assert len(open_source(f"{corpus}/*.py").files) == 25
    stdlib = open_source("python-stdlib")
    assert len(stdlib.files) > 500 and all(p.suffix == ".py" for p in stdlib.files[:50])


def test_prepare_with_a_given_tokenizer(prepared, tmp_path):
    cfg, index = prepared
    again = prepare(DataConfig(**{**cfg.__dict__, "dir": str(tmp_path / "again"),
                                  "tokenizer": f"{cfg.dir}/tokenizer.json"}))
    assert again.documents == index.documents and again.vocab_size == 512
    assert again.train_tokens == index.train_tokens  # same tokenizer, same split, same tokens


def test_manifest_versions_and_fields_are_checked(prepared, tmp_path):
    cfg, index = prepared
    copy = tmp_path / "copy"
    shutil.copytree(cfg.dir, copy)
    raw = json.loads((copy / "index.json").read_text())
    cases = [
        ({**raw, "version": 99}, r"version 99 is newer than this megalm reads \(2\); upgrade megalm"),
        ({k: v for k, v in raw.items() if k != "version"}, "no version field"),
        ({**raw, "train": [{"name": "x.tar", "samples": "many", "tokens": 1}]}, r"train\[0\].samples: expected int"),
        ({**raw, "shards": []}, r"unknown fields \['shards'\]"),
    ]
    for bad, message in cases:
        (copy / "index.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=f"{copy / 'index.json'}: .*{message}.*megalm prepare --force"):
            DataManifest.read(copy)
