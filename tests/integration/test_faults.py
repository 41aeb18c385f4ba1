"""A lost or frozen rank, and signals before the first step, on one host (issue 10, points 5 and
13).

- `kill -9` of one rank mid-run ends every rank with a non-zero exit within 30 s under the
  project's launcher, mpirun and horovodrun; the newest complete checkpoint stays and the same
  command resumes from it.
- A frozen rank (SIGSTOP: alive to the launcher, silent to its peers) ends the job within
  run.hang_timeout and a little: only the watchdog's heartbeat can see it.
- SIGTERM during set-up (what `timeout` or SLURM's time limit sends) ends the run promptly with
  exit 75 and no checkpoint; a second one ends a rank stuck in set-up at once.
- Ctrl-C: one line, exit 130, no traceback, and no rank outlives the launcher.
Each test prints its fault-to-exit time (pytest -s).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hvcodistill.mpirun import mpirun_command
from tests.conftest import ROOT
from tests.faults import (
    FAIL_FAST_S,
    STEPS,
    complete_checkpoints,
    kill_all,
    rank_pids,
    ranks_gone,
    start,
    summary_steps,
    train_command,
    wait_for,
)

pytestmark = pytest.mark.mpi

HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def launcher_command(launcher: str, np: int, command: list[str]) -> tuple[list[str], dict | None]:
    if launcher == "launch":
        return [sys.executable, "-m", "hvcodistill.launch", "-np", str(np), *command], None
    if launcher == "mpirun":
        return mpirun_command(np, command)
    _, env = mpirun_command(np, command)  # the same environment (one thread, yield when idle)
    mpi_args = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    return [HOROVODRUN, "--mpi", "-np", str(np), f"--mpi-args={mpi_args}", *command], env


def finish(proc, run_dir, timeout: float) -> tuple[float, str]:
    """Wait for the launcher; (seconds it took, its stderr). Kills what is left on a timeout."""
    start_at = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except Exception:
        kill_all(run_dir)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout:.0f} s of the fault\n{err[-3000:]}")
    return time.monotonic() - start_at, err


# mpirun alone: what `launch` runs, with the same result (measured: 137 after 2.4 s)
@pytest.mark.parametrize("launcher", ["launch", "horovodrun"])
def test_killed_rank_ends_every_rank_and_the_run_resumes(tmp_path, launcher):
    if launcher == "horovodrun" and not os.path.exists(HOROVODRUN):
        pytest.skip(f"no {HOROVODRUN} (make setup installs Horovod)")
    run_dir = tmp_path / "run"
    cmd, env = launcher_command(launcher, 4, train_command(run_dir))
    proc = start(cmd, env)
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            180,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        newest = complete_checkpoints(run_dir)[-1]
        os.kill(rank_pids(run_dir)[1], signal.SIGKILL)
        took, err = finish(proc, run_dir, 60)
    finally:
        kill_all(run_dir)
    left = ranks_gone(run_dir, 5)
    print(f"{launcher}: kill -9 of rank 1 -> launcher exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), err[-3000:]
    assert took < FAIL_FAST_S and left is not None, (took, left)
    assert newest in complete_checkpoints(run_dir), "the newest complete checkpoint was lost"
    if launcher != "launch":
        return
    # the same command again: resumes from the newest complete checkpoint and finishes
    again = start(cmd, env)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    resumed = int(err.split("resuming from step", 1)[1].split()[0].strip(",;:"))
    assert resumed >= newest and summary_steps(run_dir) == STEPS, err[-3000:]


def test_frozen_rank_is_caught_by_the_heartbeat(tmp_path):
    """SIGSTOP: the process lives, so no launcher notices; its peers wait in a collective forever
    unless the heartbeat (run.hang_timeout, here 5 s) ends the job."""
    run_dir = tmp_path / "run"
    cmd, env = mpirun_command(4, train_command(run_dir, "run.hang_timeout=5"))
    proc = start(cmd, env)
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            180,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        os.kill(rank_pids(run_dir)[2], signal.SIGSTOP)
        took, err = finish(proc, run_dir, 60)
    finally:
        kill_all(run_dir)
    print(
        f"SIGSTOP of rank 2 (hang_timeout 5 s) -> launcher exited {proc.returncode} "
        f"after {took:.1f} s"
    )
    assert proc.returncode != 0 and took < FAIL_FAST_S, err[-3000:]
    assert "no heartbeat from every rank" in err and "run.hang_timeout=5" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def slow_setup(tmp_path, *overrides):
    """Ranks generating MNIST-1D into an empty data.path (seconds: world rank 0 generates, the
    others wait on its lock); returns (launcher process, run dir, data dir)."""
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    data_dir.mkdir()
    cmd, env = mpirun_command(
        4,
        [
            sys.executable,
            "-m",
            "hvcodistill.train",
            "--config",
            str(ROOT / "configs" / "mnist1d_codistill.yaml"),
            f"data.path={data_dir}",
            f"run.dir={run_dir}",
            "train.progress=false",
            *overrides,
        ],
    )
    proc = start(cmd, env)
    # set-up is under way: the first rank has taken the generator's lock
    wait_for(
        "the MNIST-1D lock",
        lambda: list(data_dir.glob("*.lock")) and len(rank_pids(run_dir)) == 4,
        120,
        alive=lambda: proc.poll() is None,
        log=lambda: proc.stderr.read(),
    )
    return proc, run_dir, data_dir


def test_stop_signal_during_setup_ends_the_run(tmp_path):
    """SIGTERM to every rank (what SLURM sends at the time limit) while they set up: they agree and
    all exit 75 at once, without waiting for set-up to end and without a checkpoint."""
    pytest.importorskip("mnist1d")
    proc, run_dir, _ = slow_setup(tmp_path)
    try:
        for pid in rank_pids(run_dir).values():
            os.kill(pid, signal.SIGTERM)
        took, err = finish(proc, run_dir, 60)
    finally:
        kill_all(run_dir)
    print(f"SIGTERM during set-up -> launcher exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 75, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("hvcodistill:")]
    assert len(ours) == 1 and "stopped by SIGTERM during set-up" in ours[0], err[-3000:]
    assert (
        "Traceback" not in err
        and not (run_dir / "checkpoints").exists()
        or not list((run_dir / "checkpoints").rglob("*.pt"))
    ), err[-3000:]
    assert took < 15, f"{took:.1f} s: not promptly"


def test_second_signal_ends_a_rank_stuck_in_setup(tmp_path):
    """One rank frozen in set-up: the others block in a collective and cannot agree on the first
    SIGTERM; the second ends each of them at once, and the launcher the job."""
    pytest.importorskip("mnist1d")
    proc, run_dir, _ = slow_setup(
        tmp_path, "run.hang_timeout=0"
    )  # no heartbeat abort: signals only
    try:
        pids = rank_pids(run_dir)
        os.kill(pids[3], signal.SIGSTOP)
        time.sleep(1)
        for sig_round in range(2):
            for rank in (0, 1, 2):
                os.kill(pids[rank], signal.SIGTERM)
            time.sleep(1)
        took, err = finish(proc, run_dir, 30)
    finally:
        kill_all(run_dir)
    print(
        f"two SIGTERMs, one rank frozen in set-up -> launcher exited {proc.returncode} "
        f"after {took + 1:.1f} s"
    )
    assert proc.returncode != 0 and "second SIGTERM: exiting now" in err, err[-3000:]


@pytest.mark.parametrize("target", ["terminal", "ranks"])
def test_ctrl_c_is_one_line_exit_130_and_no_rank_outlives_the_launcher(tmp_path, target):
    """terminal: SIGINT to the launcher's process group (Ctrl-C; mpirun asks the ranks to stop);
    ranks: SIGINT to every rank (srun passes Ctrl-C on to the tasks, or a rank run alone)."""
    run_dir = tmp_path / "run"
    command = train_command(run_dir, f"train.steps={STEPS * 100}")
    launch = [sys.executable, "-m", "hvcodistill.launch", "-np", "4", *command]
    proc = start(launch)
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            180,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        if target == "terminal":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            for pid in rank_pids(run_dir).values():
                os.kill(pid, signal.SIGINT)
        took, err = finish(proc, run_dir, 60)
        left = rank_pids(run_dir)
    finally:
        kill_all(run_dir)
    print(f"SIGINT ({target}) -> launcher exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, (
        err[-3000:]
    )
    assert not left, f"ranks {sorted(left)} outlived the launcher"
    assert "interrupted" in err and took < 10, (took, err[-3000:])
    if target == "ranks":
        ours = [line for line in err.splitlines() if line.startswith("hvcodistill:")]
        assert len(ours) == 1 and "interrupted (SIGINT)" in ours[0], err[-3000:]
    assert complete_checkpoints(run_dir), "the checkpoints written before Ctrl-C are gone"
    shutil.rmtree(run_dir, ignore_errors=True)


def test_launcher_killed_outright_still_ends_its_ranks(tmp_path):
    """SIGKILL to the launcher alone (it cannot forward that): mpirun, its child, gets SIGTERM as
    the launcher dies (PR_SET_PDEATHSIG) and passes it to the ranks, which stop as on a preemption,
    instead of a job left running with nobody to stop it (measured: ranks gone 2.1 s later)."""
    run_dir = tmp_path / "run"
    proc = start(
        [
            sys.executable,
            "-m",
            "hvcodistill.launch",
            "-np",
            "4",
            *train_command(run_dir, f"train.steps={STEPS * 100}"),
        ]
    )
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            180,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        newest = complete_checkpoints(run_dir)[-1]
        os.kill(proc.pid, signal.SIGKILL)
        took = ranks_gone(run_dir, FAIL_FAST_S)
    finally:
        kill_all(run_dir)
        proc.communicate(timeout=30)  # mpirun and the ranks held its pipes
    print(f"SIGKILL of the launcher -> ranks gone after {took} s")
    assert took is not None, f"ranks still ran {FAIL_FAST_S} s after the launcher was killed"
    # a preemption: the ranks agree on a step, checkpoint it and stop (older checkpoints rotate out)
    assert complete_checkpoints(run_dir)[-1] >= newest, "the checkpoints went back"


REAP_PROBE = """
import os, subprocess, sys, time
from hvcodistill.mpirun import become_subreaper, reap_orphans
assert become_subreaper()
linger = float(sys.argv[1])
# like mpirun exiting while a rank it killed still tears down: the parent goes, its child stays
subprocess.run(["sh", "-c", f"sleep {linger} & echo $! > {sys.argv[2]}"], check=True)
t = time.monotonic()
killed = reap_orphans(grace=float(sys.argv[3]))
print(len(killed), round(time.monotonic() - t, 2))
"""


@pytest.mark.parametrize("linger, grace, killed", [(0.5, 10, 0), (60, 0.5, 1)])
def test_launcher_waits_for_what_mpirun_left_and_kills_it_after_a_grace(
    tmp_path, linger, grace, killed
):
    """The reason for `reap_orphans`: mpirun returned while a killed rank was still alive (CI)."""
    pid_file = tmp_path / "pid"
    out = subprocess.run(
        [sys.executable, "-c", REAP_PROBE, str(linger), str(pid_file), str(grace)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    n, took = out.stdout.split()
    assert int(n) == killed, out
    assert float(took) >= min(linger, grace) - 0.1, out  # it waited for the orphan, not less
    assert float(took) < min(linger, grace) + 5, out
    orphan = int(pid_file.read_text())
    assert (
        not os.path.exists(f"/proc/{orphan}")
        or open(f"/proc/{orphan}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    ), "the orphan is still running"
    if killed:
        assert "outlived mpirun" in out.stderr, out.stderr
