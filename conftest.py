"""The tests' pytest fixtures; pytest finds them here for test_ldalign.py and every file in tests/.

    trained                    the guide of Eq. 2 trained on synthetic examples (module)
    tiny_run, uninterrupted    a toy run (TINY_RUN) that nothing stopped, and its theta_T's weights (session: read by
                               test_ldalign.py and tests/test_rundir.py)
    paper_inputs               the paper path's inputs, built tiny on disk (module)
    one_process_run,           a paper-preset run in 1 process and in 2 (torchrun, FSDP2/gloo) (module)
    two_process_run

What they are built from, and every shared helper, is in tests/builders.py; importing it here sets one intra-op
thread (its process-wide setting) when pytest loads this file, before any test runs.
"""
import pytest

from guide import eval_guide, train_guide
from tests.builders import (
    G_PAD,
    TINY_RUN,
    _check_run_folder,
    _paper_args,
    _paper_run,
    _run,
    build_paper_inputs,
    synthetic_examples,
    tiny_guide,
)


@pytest.fixture(scope="module")
def trained():
    guide = tiny_guide(seed=0)
    ex = synthetic_examples()
    before = eval_guide(guide, ex, batch_size=8, pad_id=G_PAD, device="cpu")
    hist = train_guide(guide, ex, epochs=40, batch_size=8, lr=3e-3, pad_id=G_PAD, seed=0, device="cpu",
                       log_every=40, log_fn=lambda s: None)
    after = eval_guide(guide, ex, batch_size=8, pad_id=G_PAD, device="cpu")
    return guide, ex, hist, before, after


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The folder of a toy run (TINY_RUN) in one process that nothing stopped; tests only read it."""
    out = str(tmp_path_factory.mktemp("full") / "run")
    _run(["--out", out] + TINY_RUN)
    return out


@pytest.fixture(scope="session")
def uninterrupted(tiny_run):
    """theta_T's weights of a toy run that nothing stopped: what a killed run must resume to."""
    return _check_run_folder(tiny_run).state_dict()


@pytest.fixture(scope="module")
def paper_inputs(tmp_path_factory):
    return build_paper_inputs(str(tmp_path_factory.mktemp("paper_inputs")))


@pytest.fixture(scope="module")
def one_process_run(paper_inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("paper_run1") / "run")
    log = _paper_run(_paper_args(paper_inputs, out), name="1 process, ldalign,dpo")
    return out, log


@pytest.fixture(scope="module")
def two_process_run(paper_inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("paper_run2") / "run")
    log = _paper_run(_paper_args(paper_inputs, out), nproc=2, name="2 processes (torchrun, FSDP2/gloo), ldalign,dpo")
    return out, log
