"""Checkpoints under real ranks: preemption by signal, exact resume, corrupt files, mismatches."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from hvcodistill.mpirun import mpirun_command
from tests.conftest import ROOT

pytestmark = pytest.mark.mpi

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")
MODES = {
    "predictions": ["codistill.mode=predictions", "model.name=mlp"],
    # a CNN has BatchNorm buffers: per-rank state that must come back exactly, teachers' too
    "weights": [
        "codistill.mode=weights",
        "codistill.every=7",
        "data.order=disjoint",
        "model.name=cnn",
    ],
}


def command(run_dir, *overrides):
    return mpirun_command(
        4,
        [
            sys.executable,
            "-m",
            "hvcodistill.train",
            "--config",
            CONFIG,
            "train.epochs=0",
            "train.eval_every=0",
            "train.progress=false",
            "train.log_every=5",
            f"run.dir={run_dir}",
            *overrides,
        ],
    )


def run(run_dir, *overrides):
    cmd, env = command(run_dir, *overrides)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_same_models(a, b, n_models=2):
    for m in range(n_models):
        x, y = torch.load(a / f"model_{m}.pt"), torch.load(b / f"model_{m}.pt")
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"model {m} {k} differs"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_signal_checkpoint_and_exact_resume(tmp_path, mode):
    steps = ["train.steps=300", *MODES[mode]]
    cmd, env = command(tmp_path / "cut", *steps)
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        not (metrics.exists() and metrics.read_text().strip())
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGUSR1" in err
    stopped = sorted((tmp_path / "cut" / "checkpoints" / "model_0").glob("step_*.pt"))
    assert len(stopped) == 1 and 0 < int(stopped[0].stem.split("_")[1]) < 300

    resumed = run(tmp_path / "cut", *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr
    whole = run(tmp_path / "whole", *steps)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_models(tmp_path / "cut", tmp_path / "whole")
    a = json.loads((tmp_path / "cut" / "summary.json").read_text())
    b = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert a["exchanges"] == b["exchanges"] and a["exchanged_bytes"] == b["exchanged_bytes"]
    # wall time adds up the segments: the cut run's total exceeds its resumed segment alone
    assert (
        a["resumed_from_step"] == int(stopped[0].stem.split("_")[1]) and b["resumed_from_step"] == 0
    )
    assert a["wall_seconds"] - a["segment_seconds"] > 0.1, (a["wall_seconds"], a["segment_seconds"])
    assert b["wall_seconds"] == pytest.approx(b["segment_seconds"], abs=0.1)


def test_retention_corrupt_and_truncated_files_fall_back(tmp_path):
    steps = [
        "train.steps=40",
        "run.checkpoint_every=10",
        "run.keep_checkpoints=3",
        *MODES["weights"],
    ]
    first = run(tmp_path / "run", *steps)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    for m in (0, 1):
        assert [p.stem for p in sorted((ckpts / f"model_{m}").glob("step_*.pt"))] == [
            "step_000000020",
            "step_000000030",
            "step_000000040",
        ]
    reference = tmp_path / "reference"
    reference.mkdir()
    for m in (0, 1):
        (reference / f"model_{m}.pt").write_bytes((tmp_path / "run" / f"model_{m}.pt").read_bytes())
    # step 40 of model 1: same size, flipped bytes (only the hash can tell); step 30 of model 0:
    # cut short
    p = ckpts / "model_1" / "step_000000040.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    p = ckpts / "model_0" / "step_000000030.pt"
    p.write_bytes(p.read_bytes()[:1000])
    again = run(tmp_path / "run", *steps)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint step 40 is corrupt" in again.stderr
    assert "resuming from step 20" in again.stderr
    assert_same_models(tmp_path / "run", reference)
    # steps 25..40 ran twice; the logs hold each once (metrics.jsonl trimmed, TensorBoard purged)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [(r["model"], r["step"]) for r in rows if r["kind"] == "train"]
    assert sorted(train_rows) == [(m, s) for m in (0, 1) for s in range(5, 45, 5)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "model_1"))
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
def test_resume_with_other_settings_is_refused(tmp_path, np, override, needle):
    steps = ["train.steps=10", *MODES["weights"]]
    assert run(tmp_path / "run", *steps).returncode == 0
    cmd, env = mpirun_command(
        np,
        [
            sys.executable,
            "-m",
            "hvcodistill.train",
            "--config",
            CONFIG,
            "train.epochs=0",
            "train.progress=false",
            f"run.dir={tmp_path / 'run'}",
            *steps,
            override,
        ],
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hvcodistill:")]
    assert len(ours) == 1 and needle in ours[0] and "checkpoint" in ours[0], proc.stderr
