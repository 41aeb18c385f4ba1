"""Integrity under real ranks (issue 10): ranks holding different data stop with exit 3 (point 2);
each rank draws its own dropout masks while a group starts identical (point 4; that resume restores
them exactly is test_resume.py's signal test, predictions mode); a NaN/Inf on any rank stops every
rank at one step with exit 4, naming the model, the step and the newest checkpoint, and nothing
non-finite is saved (point 6)."""

import json

import numpy as np
import pytest
import torch

from hvcodistill.data import BatchPlan
from tests.helpers import MPI_DIR, ROOT
from tests.mpi.checks import ident, result

pytestmark = pytest.mark.mpi

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")
SHORT = ["train.epochs=0", "train.eval_every=0", "train.progress=false", "train.log_every=1"]


def ours(stderr):
    return [line for line in stderr.splitlines() if line.startswith("hvcodistill:")]


def write_npz(path, seed, n=160, bad=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
    if bad is not None:
        x[bad] = np.finfo(np.float32).max  # finite, but overflows the first layer
    np.savez(
        path,
        x_train=x,
        y_train=(np.arange(n) % 3),
        x_val=rng.normal(size=(16, 1, 4, 4)).astype(np.float32),
        y_val=np.arange(16) % 3,
    )
    return path


# ---------------------------------------------------------------- point 2
def test_ranks_with_different_data_of_one_shape_stop_with_exit_3(ranks, tmp_path):
    for rank, seed in enumerate((0, 0, 0, 1)):  # rank 3's copy differs, same shapes and labels
        write_npz(tmp_path / f"data{rank}.npz", seed)
    proc = ranks(
        4,
        [
            str(MPI_DIR / "per_rank.py"),
            "--config",
            CONFIG,
            *SHORT,
            "train.steps=2",
            "data.name=npz",
            f"data.path={tmp_path}/data{{rank}}.npz",
            f"run.dir={tmp_path / 'run'}",
        ],
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = ours(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("hvcodistill: error: ranks hold different data: ")
    assert f"rank 0 (data.path='{tmp_path}/data0.npz')" in lines[0]
    assert f"rank 3 (data.path='{tmp_path}/data3.npz')" in lines[0] and "fingerprints" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_copies_of_the_same_data_at_other_paths_train(ranks, tmp_path):
    for rank in range(2):
        write_npz(tmp_path / f"data{rank}.npz", 0)
    proc = ranks(
        2,
        [
            str(MPI_DIR / "per_rank.py"),
            "--config",
            CONFIG,
            *SHORT,
            "train.steps=2",
            "data.name=npz",
            f"data.path={tmp_path}/data{{rank}}.npz",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    assert "hvcodistill: done" in proc.stdout


# ---------------------------------------------------------------- point 4
@pytest.mark.parametrize("check", [(4, "dropout")], ids=ident)
def test_each_rank_its_own_dropout_masks_and_one_init_per_group(request, check):
    assert result(request, check) == "dropout ok: W=4 M=2"


# ---------------------------------------------------------------- point 6
N, B, G = 160, 8, 2  # 10 steps per epoch


def bad_sample():
    """A sample that model 1 meets at step 2 and model 0 only at step 7 (data.order=disjoint)."""
    plan = BatchPlan(
        n_samples=N,
        batch_size=B,
        group_size=G,
        group_rank=1,
        n_models=2,
        model_id=1,
        order="disjoint",
        seed=0,
    )
    return int(plan.key(2)[1][0])


@pytest.mark.parametrize(
    "case,overrides,stop,newest",
    [
        # the agreement before a checkpoint: step 2 is saved, step 4 is not
        (
            "checkpoint",
            ["train.steps=8", "run.checkpoint_every=2", "run.preempt_check_every=1000"],
            4,
            2,
        ),
        # the preemption check's world all-reduce carries the flag: posted after step 3, read
        # after 4
        (
            "guard",
            ["train.steps=8", "run.checkpoint_every=0", "run.preempt_check_every=1"],
            4,
            None,
        ),
        # the last step: no final checkpoint, model or summary
        (
            "end",
            ["train.steps=3", "run.checkpoint_every=0", "run.preempt_check_every=1000"],
            3,
            None,
        ),
    ],
)
def test_non_finite_stops_every_rank_at_one_step_with_exit_4(
    ranks, tmp_path, case, overrides, stop, newest
):
    data = write_npz(tmp_path / "data.npz", 0, n=N, bad=bad_sample())
    run = tmp_path / "run"
    proc = ranks(
        4,
        [
            "-m",
            "hvcodistill.train",
            "--config",
            CONFIG,
            *SHORT,
            *overrides,
            "data.name=npz",
            f"data.path={data}",
            f"train.batch_size={B}",
            "codistill.mode=weights",
            "codistill.alpha=0",
            "data.order=disjoint",
            "optim.lr_schedule=constant",
            "optim.warmup=0",
            f"run.dir={run}",
        ],
        check=False,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = ours(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(
        "hvcodistill: error: non-finite loss or gradient (NaN/Inf) in model 1 at step 2 "
    )
    assert f"every rank stopped at step {stop}," in lines[0]
    if newest is None:
        assert "no checkpoint was written" in lines[0]
    else:
        assert f"newest checkpoint: step {newest} in {run / 'checkpoints'}" in lines[0]
    saved = sorted((run / "checkpoints").glob("model_*/step_*.pt"))
    assert [int(p.stem.split("_")[1]) for p in saved] == ([newest] * 2 if newest else [])
    for path in saved:  # nothing non-finite is ever written
        state = torch.load(path, weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list(run.glob("model_*.pt")) and not (run / "summary.json").exists()
    rows = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").exists()
        else []
    )
    assert max((r["step"] for r in rows), default=0) <= stop
