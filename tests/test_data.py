"""The training data stream: the global batch alone decides the data order (any data-parallel size,
any number of loader workers), exact resume across a change of data-parallel size with every token
seen once, weighted mixing, http and pipe: sources, and bad shards named or skipped.

Shards are built here so that every token names its document: document d is d repeated, so
counting token values counts how often each document's tokens were trained on.
"""

import functools
import http.server
import json
import shutil
import threading

import numpy as np
import pytest
import torch
import webdataset as wds
import xxhash

from megalm.common import IGNORE
from megalm.config import BatchLayout, DataConfig, MixSource
from megalm.data.dataset import apportion, open_sources
from megalm.data.loader import TrainLoader, validation_sequences
from megalm.data.manifest import DataManifest, PrepareSettings, ShardEntry
from megalm.errors import DataError
from megalm.train.objective import CausalLM
from tests.helpers import CONFIG, TINY, run_megalm

SEQ = 16
EOT = 0


def write_dataset(root, first_doc, shard_docs, tokenizer_hash="t" * 64):
    """Shards of documents ``first_doc, first_doc+1, …``; doc d is [d] * len, lengths uneven."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(first_doc)
    entries, doc = [], first_doc
    for i, n in enumerate(shard_docs + [6]):  # the last shard is the validation split
        name = f"{'val' if i == len(shard_docs) else 'train'}-{i:06d}.tar"
        samples, tokens = 0, 0
        with wds.TarWriter(str(root / name)) as tar:
            for _ in range(n):
                length = int(rng.integers(3, 40))
                tar.write({"__key__": f"{doc:09d}", "tokens.npy": np.full(length, doc, np.uint16)})
                samples, tokens, doc = samples + 1, tokens + length, doc + 1
        data = (root / name).read_bytes()
        entries.append(ShardEntry(name, samples, tokens, len(data), xxhash.xxh3_64_hexdigest(data)))
    settings = PrepareSettings("test", "", 0, 0.1, 0, 0, "text", "none", 1, False)
    DataManifest(settings=settings, source="test", tokenizer="tokenizer.json", tokenizer_hash=tokenizer_hash,
                 vocab_size=65000, eot_id=EOT, dtype="uint16", documents=doc - first_doc, skipped=[],
                 train=entries[:-1], val=entries[-1:], train_tokens=sum(e.tokens for e in entries[:-1]),
                 val_tokens=entries[-1].tokens, unigram_entropy_nats=0.0, prepare_seconds=0.0).write(root)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    return write_dataset(root / "a", 1, [17, 5, 30, 11, 9, 23, 2, 14]), write_dataset(root / "b", 1000, [12, 8, 20])


def data_cfg(data_dir, **kw):
    return DataConfig(dir=str(data_dir), seq_len=SEQ, shuffle_tokens=64, seed=7, **kw)


def loaders(cfg, batch, dp, micro=2, workers=0, state=None):
    sources = open_sources(cfg, batch)
    out = []
    for r in range(dp):
        per_rank = -(-batch // dp)
        mb = min(micro, per_rank)
        it = TrainLoader(sources, BatchLayout(batch, dp, mb, -(-per_rank // mb)), r, CausalLM(),
                         num_workers=workers, on_bad_shard=cfg.on_bad_shard)
        if state is not None:
            it.load_state_dict(state)
        out.append(it)
    return out


def global_batches(its, steps):
    """The global batch of each step: all ranks' real rows, in rank order."""
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        for p in parts:  # what the trainer feeds the model: inputs and labels of every micro-batch
            x = torch.cat([mb[0] for mb in p.micro_batches])[:len(p.sequences)]
            torch.testing.assert_close(x, p.sequences[:, :-1])
        out.append(torch.cat([p.sequences for p in parts]))
    return out


def test_any_dp_and_workers_give_the_same_global_batches(corpus):
    cfg = data_cfg(corpus[0])
    reference = global_batches(loaders(cfg, 6, 1), 12)
    for dp, workers in [(2, 0), (3, 2), (4, 1), (6, 0)]:  # 4 ranks of a batch of 6: two take a padding row
        its = loaders(cfg, 6, dp, workers=workers)
        got = global_batches(its, 12)
        assert [len(b) for b in got] == [6] * 12
        for a, b in zip(reference, got):
            torch.testing.assert_close(a, b)
        steps = {it.state_dict()["step"] for it in its}
        assert steps == {12}  # equal batch counts on every rank, however uneven the shards


def test_padding_rows_carry_no_loss(corpus):
    its = loaders(data_cfg(corpus[0]), 6, 4, micro=2)
    step = next(its[3])  # rank 3 of 4 takes rows 4..5 of 6, rank 0 rows 0..0 plus one padding row
    first = next(its[0])
    assert len(first.sequences) == 1 and len(first.micro_batches) == 1
    assert (first.micro_batches[0][1][1] == IGNORE).all() and first.loss_tokens == SEQ
    assert step.loss_tokens == 2 * SEQ


def test_one_epoch_uses_every_token_once_across_dp_changes(corpus):
    """Resume mid-epoch on another data-parallel size: 2 -> 3, 4 -> 1, 1 -> 4; every document's
    tokens arrive exactly once over the epoch, and the batches equal an uninterrupted run's."""
    cfg = data_cfg(corpus[0])
    batch = 12
    (source,) = open_sources(cfg, batch)
    epoch = source.steps_per_epoch
    assert epoch >= 4
    reference = torch.cat(global_batches(loaders(cfg, batch, 1), epoch))
    for before, after in [(2, 3), (4, 1), (1, 4)]:
        its = loaders(cfg, batch, before, workers=1 if before == 2 else 0)
        first = global_batches(its, epoch // 2)
        state = its[0].state_dict()
        assert all(it.state_dict() == state for it in its)
        rest = global_batches(loaders(cfg, batch, after, state=state), epoch - epoch // 2)
        torch.testing.assert_close(torch.cat(first + rest), reference)
    seen = np.bincount(reference.flatten().numpy(), minlength=2000)
    lengths = {}
    for shard in source.manifest.train:
        for sample in wds.WebDataset(str(corpus[0] / shard.name), shardshuffle=False, empty_check=False):
            doc = np.load(__import__("io").BytesIO(sample["tokens.npy"]))
            lengths[int(doc[0])] = len(doc)
    used = batch * epoch * (SEQ + 1)
    assert reference.numel() == used
    assert all(seen[d] <= n for d, n in lengths.items())  # nothing twice
    assert sum(seen[d] for d in lengths) + seen[EOT] == used  # only documents' tokens and their separators
    assert sum(lengths.values()) + len(lengths) - used < batch * (SEQ + 1)  # only the epoch's short tail unused


def test_mixing_by_weight_is_exact_per_step(corpus):
    a, b = corpus
    cfg = DataConfig(mix=[MixSource(str(a), 0.75), MixSource(str(b), 0.25)], seq_len=SEQ, shuffle_tokens=64, seed=7)
    its = loaders(cfg, 8, 2)
    totals = np.zeros(2)
    for batch in global_batches(its, 10):
        from_b = (batch >= 1000).any(dim=1).sum().item()
        assert from_b == 2  # rows 6, 7 of every global batch are source b's lanes
    for it in its:
        totals += next(it).tokens_by_source
    assert totals.tolist() == [6 * SEQ, 2 * SEQ]
    for weights, total in [([0.7, 0.3], 16), ([1, 1, 1], 10), ([0.5, 0.3, 0.2], 7)]:
        shares = apportion(weights, total)
        assert sum(shares) == total
        assert all(abs(s / total - w / sum(weights)) < 1 / total for s, w in zip(shares, weights))
    other = write_dataset(a.parent / "other-tokenizer", 5000, [10, 10], tokenizer_hash="u" * 64)
    with pytest.raises(DataError, match=r"data.mix\[1\]: .*other-tokenizer was prepared with another tokenizer"):
        open_sources(DataConfig(mix=[MixSource(str(a)), MixSource(str(other))], seq_len=SEQ), 8)


def test_http_and_pipe_sources_equal_local(corpus, tmp_path):
    cfg = data_cfg(corpus[0])
    reference = global_batches(loaders(cfg, 4, 1), 6)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(corpus[0]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        for where in [dict(dir=url), dict(dir=f"pipe:cat {corpus[0]}/{{}}"),
                      dict(dir=str(corpus[0]), shards=f"{url}train-{{000000..000007}}.tar")]:
            remote = data_cfg(where.pop("dir"), cache_dir=str(tmp_path / "cache"), **where)
            got = global_batches(loaders(remote, 4, 2, workers=1), 6)
            for x, y in zip(reference, got):
                torch.testing.assert_close(x, y)
            torch.testing.assert_close(validation_sequences(open_sources(remote, 4), 4, tmp_path),
                                       validation_sequences(open_sources(cfg, 4), 4, tmp_path))
        with pytest.raises(DataError, match=r"unreachable|missing"):
            global_batches(loaders(data_cfg(url, shards=f"{url}nowhere/"), 4, 1), 1)
    finally:
        server.shutdown()


def damage(root, name, how):
    path = root / name
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # one flipped byte: a valid tar of the right size that is not the one prepared
        data = bytearray(path.read_bytes())
        data[700] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,problem", [("missing", "missing"), ("truncated", "holds 1000 bytes"),
                                         ("corrupt", "checksum .* differs")])
def test_bad_shard_is_named_or_skipped_as_a_hole(corpus, tmp_path, how, problem):
    copy = tmp_path / "copy"
    shutil.copytree(corpus[0], copy)
    (source,) = open_sources(data_cfg(copy), 4)
    bad = source.manifest.train[3]
    damage(copy, bad.name, how)
    steps = source.steps_per_epoch
    with pytest.raises(DataError, match=f"shard {copy / bad.name}: {problem}.*data.on_bad_shard=skip"):
        global_batches(loaders(data_cfg(copy), 4, 2), steps)

    reference = global_batches(loaders(data_cfg(corpus[0]), 4, 1), steps)
    its = loaders(data_cfg(copy, on_bad_shard="skip"), 4, 2, workers=1)
    reports, counted = [], 0
    for ref in reference:
        parts = [next(it) for it in its]
        got = torch.cat([p.sequences for p in parts])
        reports += [u for p in parts for u in p.bad_shards]
        counted += sum(p.loss_tokens for p in parts)
        # the bad shard's documents become a hole of end-of-text tokens; everything else is unmoved
        docs_of_bad = range(1 + sum(s.samples for s in source.manifest.train[:3]),
                            1 + sum(s.samples for s in source.manifest.train[:4]))
        hole = torch.isin(ref, torch.tensor(list(docs_of_bad)))
        torch.testing.assert_close(got[~hole], ref[~hole])
        assert (got[hole] == EOT).all()
    assert reports == [str(copy / bad.name)]  # reported once, by the lane it starts in
    assert counted < len(reference) * 4 * SEQ  # the hole's labels do not count


def test_resume_refuses_another_global_batch(corpus):
    cfg = data_cfg(corpus[0])
    (it,) = loaders(cfg, 4, 1)
    next(it)
    with pytest.raises(DataError, match="global_batch=4, this run has 8"):
        loaders(cfg, 8, 1, state=it.state_dict())


def test_validation_sequences_are_fixed_and_shared_by_weight(corpus, tmp_path):
    a, b = corpus
    cfg = DataConfig(mix=[MixSource(str(a), 0.75), MixSource(str(b), 0.25)], seq_len=8, seed=7)
    val = validation_sequences(open_sources(cfg, 4), 4, tmp_path)
    assert val.shape == (4, 9)
    assert ((val >= 1000).any(dim=1)).sum() == 1  # one of four from b
    torch.testing.assert_close(val, validation_sequences(open_sources(cfg, 4), 4, tmp_path))


def test_bench_data_reports_loader_and_raw_read(data_dir, tmp_path):
    out = tmp_path / "results"
    run_megalm("bench", "data", CONFIG, *TINY, f"data.dir={data_dir}", "--workers", "0,1", "--tokens", "2e5",
               "--train-steps", "6", "--out", str(out))
    result = json.loads((out / "data.json").read_text())
    rows = {r["what"]: r for r in result["rows"]}
    assert rows["raw read of prepared's shards (page cache)"]["tokens_per_s"] > 0
    assert rows["loader, 1 workers"]["per_worker"] == rows["loader, 1 workers"]["tokens_per_s"] > 0
    wait = rows["training: waiting for data, steady state (steps to 6)"]["fraction"]
    assert 0 <= wait < 1
    assert result["meta"]["global_batch"] == 4 and "| loader, 0 workers" in (out / "data.md").read_text()
