"""Checkpoints under real ranks: preemption by signal, exact resume, corrupt files, mismatches.

The retention and refusal tests read one cached weights-mode run (tests/runs.py `weights_run`,
trained once per session) and damage or resume copies of it."""

import json
import signal
import sys

import pytest
import torch

from hvcodistill.mpirun import mpirun_command
from tests.faults import kill_all, start, wait_for
from tests.helpers import one_line_exit, ours, run_ranks
from tests.runs import QUIET, WEIGHTS_MODE, copy_run, train_args

pytestmark = pytest.mark.mpi

MODES = {
    # dropout: each rank's RNG (its masks) must come back exactly too
    "predictions": ("codistill.mode=predictions", "model.name=mlp", "model.dropout=0.3"),
    "weights": WEIGHTS_MODE,  # BatchNorm buffers: per-rank state that must come back exactly
}
# steps of the signalled run: at the slowest step seen here (~50 ms) that is over a year, so the
# signal is its only end
UNBOUNDED = 10**9
AFTER = 30  # steps the resumed run trains past the step it was stopped at (4 refreshes at k = 7)


def assert_same_models(a, b, n_models=2):
    for m in range(n_models):
        x, y = torch.load(a / f"model_{m}.pt"), torch.load(b / f"model_{m}.pt")
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"model {m} {k} differs"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_signal_checkpoint_and_exact_resume(tmp_path, mode):
    """SIGUSR1 to mpirun stops every rank at one step s with a checkpoint (exit 75); resumed to
    s + AFTER steps, the run ends bitwise as an uninterrupted run of s + AFTER steps, with the
    same exchanges, and its wall time adds the segments up. Per-rank state comes back exactly:
    dropout masks (the MLP of predictions mode) and BatchNorm buffers (the CNN of weights mode).

    No race with the clock: the signalled run has train.steps=UNBOUNDED, so it cannot end before
    the signal, whenever the signal lands; s is whatever step the ranks agreed on, read from the
    checkpoint. The constant lr schedule is what lets the resumed run (and the reference) end at
    s + AFTER: no setting that shapes the trajectory depends on train.steps (the resume check
    allows a changed step count exactly then). Burn-in 0: the models exchange in both segments."""
    settings = [*QUIET, *MODES[mode], "optim.lr_schedule=constant", "codistill.burn_in_steps=0"]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    cmd, env = mpirun_command(
        4, [sys.executable, *train_args(cut, *settings, f"train.steps={UNBOUNDED}")]
    )
    proc = start(cmd, env)
    try:
        # a first log line: every rank has trained (the preemption guard's, not set-up's, signal)
        metrics = cut / "metrics.jsonl"
        wait_for(
            "a first log line",
            lambda: metrics.exists() and metrics.read_text().strip(),
            300,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
        _, err = proc.communicate(timeout=300)
    finally:
        kill_all(cut)  # nothing is left if it went as it should; an unbounded run must not linger
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGUSR1" in err
    stopped = sorted((cut / "checkpoints" / "model_0").glob("step_*.pt"))
    assert len(stopped) == 1, stopped  # checkpoint_every=0: only the stop's
    s = int(stopped[0].stem.split("_")[1])
    assert 0 < s < UNBOUNDED
    wall_before = torch.load(stopped[0], weights_only=False)["ranks"][0]["timer"]["wall_s"]

    end = [*settings, f"train.steps={s + AFTER}"]
    resumed = run_ranks(4, train_args(cut, *end))
    assert f"resuming from step {s}" in resumed.stderr
    run_ranks(4, train_args(whole, *end))
    assert_same_models(cut, whole)
    a = json.loads((cut / "summary.json").read_text())
    b = json.loads((whole / "summary.json").read_text())
    assert a["steps"] == b["steps"] == s + AFTER
    assert a["exchanges"] == b["exchanges"] > 0 and a["exchanged_bytes"] == b["exchanged_bytes"]
    assert a["resumed_from_step"] == s and b["resumed_from_step"] == 0
    # wall time adds up the segments: the cut run's total is its resumed segment plus the wall
    # time its checkpoint recorded; a fresh run's is its one segment. The tolerance stands for
    # two clock reads in a row (the summary's two fields), far less than the first segment.
    gap = wall_before / 2
    assert wall_before > 0
    assert a["wall_seconds"] - a["segment_seconds"] == pytest.approx(wall_before, abs=gap)
    assert b["wall_seconds"] - b["segment_seconds"] == pytest.approx(0, abs=gap)


def test_retention_corrupt_and_truncated_files_fall_back(tmp_path, weights_run):
    """The newest 3 checkpoints are kept; a corrupt (same size) and a truncated one are skipped,
    the resume from the newest good step ends exactly as the uninterrupted run, and the logs hold
    each step once."""
    for m in (0, 1):
        assert [
            p.stem for p in sorted(weights_run.dir.glob(f"checkpoints/model_{m}/step_*.pt"))
        ] == [
            "step_000000020",
            "step_000000030",
            "step_000000040",
        ]
    run_dir = copy_run(weights_run, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    # step 40 of model 1: same size, flipped bytes (only the hash can tell); step 30 of model 0:
    # cut short
    p = ckpts / "model_1" / "step_000000040.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    p = ckpts / "model_0" / "step_000000030.pt"
    p.write_bytes(p.read_bytes()[:1000])
    again = run_ranks(4, train_args(run_dir, *weights_run.overrides))
    assert "checkpoint step 40 is corrupt" in again.stderr
    assert "resuming from step 20" in again.stderr
    assert_same_models(run_dir, weights_run.dir)  # the cached run is the uninterrupted one
    # steps 25..40 ran twice; the logs hold each once (metrics.jsonl trimmed, TensorBoard purged)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [(r["model"], r["step"]) for r in rows if r["kind"] == "train"]
    assert sorted(train_rows) == [(m, s) for m in (0, 1) for s in range(5, 45, 5)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb" / "model_1"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/task_loss")] == list(range(5, 45, 5))


@pytest.mark.parametrize(
    "np,override,needle",
    [
        (4, "codistill.every=3", "codistill.every"),
        (2, "codistill.every=7", "W=4 M=2 G=2"),
        (4, "run.resume=false", "run.resume=false"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, weights_run, np, override, needle):
    """A copy of the one cached weights run, resumed three wrong ways: exit 2, one line naming the
    setting and the checkpoint."""
    run_dir = copy_run(weights_run, tmp_path / "run")
    proc = run_ranks(np, train_args(run_dir, *weights_run.overrides, override), check=False)
    one_line_exit(proc, 2, needle, "checkpoint")
    assert len(ours(proc.stderr)) == 1, proc.stderr[-3000:]  # and no other line of ours
