"""Shared fixtures of the framework's tests (the kernels' tests have their own, in kernels/tests)."""

import pytest

from tests.helpers import CONFIG, TINY, make_corpus, run_megalm

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
               "train.steps=6", "train.save_every=3", "train.eval_every=3", "train.profile.steps=[2,3]")
    return run_dir
