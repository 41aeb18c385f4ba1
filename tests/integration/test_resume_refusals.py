"""Resume and run.dir hardening under real ranks: refused resumes touch nothing, lost or damaged
checkpoints, run.dir entries of the wrong kind, run.dir not shared, a disk that fills.

The resume cases work on copies of one cached 2-rank run (tests/runs.py `short_run`: 20 steps,
checkpoints at 10 and 20, constant lr), trained once per session."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from hvcodistill.mpirun import mpirun_command
from tests.faults import DISK_FULL_S
from tests.helpers import ROOT, one_line_exit, ours, run_ranks
from tests.runs import SHORT_RUN, copy_run, train_args

pytestmark = pytest.mark.mpi

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tmpfs or a mount namespace needs root"
)


def run(run_dir, *overrides, np=2):
    """The short run's command (tests/runs.py SHORT_RUN) in `run_dir`, `overrides` last."""
    return run_ranks(np, train_args(run_dir, *SHORT_RUN, *overrides), check=False)


def snapshot(run_dir):
    """Every entry of run.dir with its bytes: what a refused start must leave as it was."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes() if p.is_file() else None)
        for p in run_dir.rglob("*")
    }


def test_refused_or_impossible_resumes_leave_run_dir_untouched_and_damage_is_warned(
    tmp_path, short_run
):
    r = copy_run(short_run, tmp_path / "run")
    before = snapshot(r)

    # another trajectory-changing setting: refused, naming the newest checkpoint; nothing written
    line = one_line_exit(run(r, "optim.lr=0.1"), 2)
    assert "step_000000020.json" in line and "optim.lr=0.05" in line and "optim.lr=0.1" in line
    assert snapshot(r) == before

    # one model's checkpoints gone: refused (never a fresh start that prunes the other model's)
    shutil.move(r / "checkpoints" / "model_1", tmp_path / "aside")
    after_move = snapshot(r)
    line = one_line_exit(run(r), 2)
    assert "model 1 has none" in line and "new run.dir" in line
    assert snapshot(r) == after_move
    shutil.move(tmp_path / "aside", r / "checkpoints" / "model_1")

    # the newest step damaged (a truncated file, a garbage sidecar): warned, the previous one used
    pt = r / "checkpoints" / "model_0" / "step_000000020.pt"
    pt.write_bytes(pt.read_bytes()[:1000])
    (r / "checkpoints" / "model_1" / "step_000000020.json").write_text("{garbage")
    again = run(r)
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in ours(again.stderr) if "warning: checkpoint" in line]
    assert len(warnings) == 1, again.stderr
    assert (
        "checkpoint step 20 is incomplete" in warnings[0]
        and "truncated" in warnings[0]
        and "step_000000020.json is unreadable" in warnings[0]
    )
    assert "resuming from step 10" in again.stderr


def test_run_dir_entry_of_the_wrong_kind(tmp_path):
    """Under ranks: one line, exit 2, nothing written (no lock, no temporary). Which entries are
    checked, each kind, is tests/unit/test_rundir.py's (in-process)."""
    r = tmp_path / "run"
    r.mkdir()
    (r / "summary.json").mkdir()
    line = one_line_exit(run(r), 2)
    assert f"run.dir entry {r / 'summary.json'} should be" in line
    assert [p.name for p in r.iterdir()] == ["summary.json"]  # nothing written, no temporary left


@needs_root
def test_run_dir_not_shared_between_writers(tmp_path):
    """Model 1's writer runs in its own mount namespace with a tmpfs over the runs' folder, as a
    node whose run.dir is on local disk: world rank 0 cannot see its mark."""
    runs = tmp_path / "runs"
    runs.mkdir()
    argv = [sys.executable, *train_args(runs / "r", *SHORT_RUN)]
    cmd, env = mpirun_command(1, argv)
    local = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs tmpfs "{runs}" && exec "$@"',
        "sh",
        *argv,
    ]
    proc = subprocess.run(
        cmd + [":", "-np", "1", *local],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_exit(proc, 2)
    assert (
        "is not one directory shared by every node" in line
        and "model 1's checkpoint writer" in line
    )
    assert not (runs / "r" / ".writers").exists() and not (runs / "r" / "config.yaml").exists()


@needs_root
def test_disk_full_while_checkpointing(tmp_path, short_run):
    """A tmpfs that fills: one line, exit 74, every rank gone within DISK_FULL_S of the error (a
    promise), the previous checkpoint intact and resumed from once there is space again. The run
    extended is a copy of the cached short run (constant lr: train.steps may grow)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    try:
        r = copy_run(short_run, disk / "run")
        ckpt_bytes = (r / "checkpoints" / "model_0" / "step_000000020.pt").stat().st_size
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:  # leave room for logs, not a checkpoint
            f.write(b"\0" * (free - ckpt_bytes // 2))
        cmd, env = mpirun_command(2, [sys.executable, *train_args(r, *SHORT_RUN, "train.steps=40")])
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        err, fault = [], None
        for line in proc.stderr:
            err.append(line)
            if "cannot write checkpoint" in line:
                fault = time.perf_counter()
        proc.wait(timeout=120)
        assert fault is not None, "".join(err)[-3000:]
        to_exit = time.perf_counter() - fault
        full = subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.read(), "".join(err))
        line = one_line_exit(full, 74)
        assert "No space left on device" in line and "step_000000030" in line, line
        assert to_exit < DISK_FULL_S, to_exit
        print(f"disk full: error line to exit of every rank {to_exit:.2f}s")
        names = sorted(p.name for p in (r / "checkpoints").rglob("*"))
        partial = [n for n in names if "000000030" in n or ".tmp" in n]
        assert not partial, names  # nothing partial left

        (disk / "filler").unlink()
        again = run(r, "train.steps=40")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming from step 20" in again.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
