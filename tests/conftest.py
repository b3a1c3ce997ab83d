"""Shared fixtures of the framework's tests (the kernels' tests have their own, in kernels/tests)."""

import stat

import pytest

from tests.helpers import CONFIG, DENY_SCRIPT, TINY, Watched, make_corpus, run_megalm


# The files that take longest, started first so that neither of the two workers (pyproject.toml's
# addopts) is left with a long file at the end; the rest keep their order.
LONGEST_FIRST = ["test_slurm.py", "test_checkpoint.py", "test_self_healing.py", "test_parallel.py", "test_pipeline.py",
                 "test_train.py",
                 "test_failures.py", "test_plan.py", "test_classify.py", "test_activation_memory.py", "test_masked.py",
                 "test_gpu_check.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def no_leftover_commands():
    """A test that fails half way leaves no background run eating the CPU of the next ones."""
    yield
    while Watched.running:
        Watched.running.pop().kill()

# session-scoped: each is a real, separately launched run


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small real corpus, prepared once: 24 standard-library modules, vocab 512."""
    root = tmp_path_factory.mktemp("train")
    corpus = make_corpus(root / "corpus")
    out = root / "prepared"
    run_megalm("prepare", CONFIG, *TINY, f"data.source={corpus}", f"data.dir={out}")
    return out


@pytest.fixture(scope="session")
def data_args(data_dir):
    """The overrides that point a run at the prepared corpus (training checks they match it)."""
    return [f"data.source={data_dir.parent / 'corpus'}", f"data.dir={data_dir}"]


@pytest.fixture(scope="session")
def single_run(data_args, tmp_path_factory):
    """The reference: one plain process, 6 steps, checkpoints at 3 and 6; steps 2-3 profiled."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_megalm("train", CONFIG, *TINY, *data_args, f"train.run_dir={run_dir}",
               "train.steps=6", "train.save_every=3", "train.eval_every=3", "train.profile.steps=[2,3]",
               "train.plot=true")
    return run_dir


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """The test corpus cut into 40-line documents, prepared into ~230 small shards, so that each
    lane opens a new shard every ~20 steps: a failing storage command then fails mid-training."""
    root = tmp_path_factory.mktemp("small")
    corpus = make_corpus(root / "whole")
    docs = root / "docs"
    docs.mkdir()
    for f in sorted(corpus.glob("*.py")):
        lines = f.read_text().splitlines(keepends=True)
        for i in range(0, len(lines), 40):
            (docs / f"{f.stem}_{i:05d}.py").write_text("".join(lines[i:i + 40]))
    out = root / "prepared"
    run_megalm("prepare", CONFIG, *TINY, f"data.source={docs}", f"data.dir={out}", "data.shard_tokens=400")
    deny = root / "deny.sh"
    deny.write_text(DENY_SCRIPT)
    deny.chmod(deny.stat().st_mode | stat.S_IEXEC)
    return out, deny
