"""A lost or frozen rank, and signals before the first step, on one host (issue 10, points 5 and
13).

- `kill -9` of one rank mid-run ends every rank with a non-zero exit within 30 s (FAIL_FAST_S)
  under the project's launcher, mpirun and horovodrun; the newest complete checkpoint stays and
  the same command resumes from it.
- A frozen rank (SIGSTOP: alive to the launcher, silent to its peers) ends the job within
  run.hang_timeout and a little (within FAIL_FAST_S): only the watchdog's heartbeat can see it.
- SIGTERM during set-up (what `timeout` or SLURM's time limit sends) ends the run without waiting
  for set-up, with exit 75 and no checkpoint; a second one ends a rank stuck in set-up at once.
- Ctrl-C: one line, exit 130, no traceback, no rank outlives the launcher, within 10 s (CTRL_C_S).
The only time bounds are those promises. No fault races the run's end: a broken run has
train.steps=UNBOUNDED, or is held in set-up on a lock the test holds (tests/faults.py).
Each test prints its fault-to-exit time (pytest -s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hvcodistill.mpirun import mpirun_command
from tests.faults import (
    CTRL_C_S,
    UNBOUNDED,
    complete_checkpoints,
    kill_all,
    pending,
    rank_pids,
    ranks_gone,
    setup_held,
    start,
    stopped,
    summary_steps,
    train_command,
    training,
    wait_for,
    waiting_on,
)
from tests.helpers import FAIL_FAST_S, ROOT

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
    """kill -9 of rank 1 in an unbounded run (it cannot finish first): every rank gone within
    FAIL_FAST_S of the kill, the newest complete checkpoint kept; the same command, given an end
    (train.steps; constant lr, so it may change), resumes from it and finishes."""
    if launcher == "horovodrun" and not os.path.exists(HOROVODRUN):
        pytest.skip(f"no {HOROVODRUN} (make setup installs Horovod)")
    run_dir = tmp_path / "run"
    cmd, env = launcher_command(launcher, 4, train_command(run_dir, f"train.steps={UNBOUNDED}"))
    with training(cmd, env, run_dir) as proc:
        newest = complete_checkpoints(run_dir)[-1]
        os.kill(rank_pids(run_dir)[1], signal.SIGKILL)
        took, err = finish(proc, run_dir, 60)
        left = ranks_gone(run_dir, FAIL_FAST_S)  # after the launcher: what it left running
    print(f"{launcher}: kill -9 of rank 1 -> launcher exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), err[-3000:]
    assert left is not None and took + left < FAIL_FAST_S, (took, left)
    # (>=: the ranks may write and rotate a checkpoint or two between the read and the kill)
    kept = complete_checkpoints(run_dir)
    assert kept and kept[-1] >= newest, "the newest complete checkpoint was lost"
    if launcher != "launch":
        return
    # the same command again: resumes from the newest complete checkpoint and finishes
    end = kept[-1] + 20
    cmd, env = launcher_command(launcher, 4, train_command(run_dir, f"train.steps={end}"))
    again = start(cmd, env)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    resumed = int(err.split("resuming from step", 1)[1].split()[0].strip(",;:"))
    assert resumed == kept[-1] and summary_steps(run_dir) == end, err[-3000:]


def test_frozen_rank_is_caught_by_the_heartbeat(tmp_path):
    """SIGSTOP: the process lives, so no launcher notices; its peers wait in a collective forever
    unless the heartbeat (run.hang_timeout, here 5 s) ends the job, within FAIL_FAST_S."""
    run_dir = tmp_path / "run"
    cmd, env = mpirun_command(
        4, train_command(run_dir, "run.hang_timeout=5", f"train.steps={UNBOUNDED}")
    )
    with training(cmd, env, run_dir) as proc:
        os.kill(rank_pids(run_dir)[2], signal.SIGSTOP)
        took, err = finish(proc, run_dir, 60)
    print(
        f"SIGSTOP of rank 2 (hang_timeout 5 s) -> launcher exited {proc.returncode} "
        f"after {took:.1f} s"
    )
    assert proc.returncode != 0 and took < FAIL_FAST_S, err[-3000:]
    assert "no heartbeat from every rank" in err and "run.hang_timeout=5" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@contextlib.contextmanager
def held_in_setup(tmp_path, *overrides):
    """4 ranks of an MNIST-1D run, all waiting in set-up on the data cache's lock, which the test
    holds: set-up cannot end while the block runs. Yields (launcher, run dir, rank pids)."""
    pytest.importorskip("mnist1d")
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    with setup_held(data_dir) as lock:
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
        try:
            # every rank is in set-up (its watchdog started before), blocked on our lock
            wait_for(
                f"4 ranks waiting on {lock} (has its name changed?)",
                lambda: (
                    len(rank_pids(run_dir)) == 4
                    and set(rank_pids(run_dir).values()) <= waiting_on(lock)
                ),
                120,
                alive=lambda: proc.poll() is None,
                log=lambda: proc.stderr.read(),
            )
            yield proc, run_dir, rank_pids(run_dir)
        finally:
            kill_all(run_dir)


def test_stop_signal_during_setup_ends_the_run(tmp_path):
    """SIGTERM to every rank (what SLURM sends at the time limit) while they set up: they agree and
    all exit 75, without a checkpoint. Set-up cannot end meanwhile (the test holds the data lock
    they wait on), so the exit shows that they did not wait for it."""
    with held_in_setup(tmp_path) as (proc, run_dir, pids):
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        took, err = finish(proc, run_dir, 60)
    print(f"SIGTERM during set-up -> launcher exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 75, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("hvcodistill:")]
    assert len(ours) == 1 and "stopped by SIGTERM during set-up" in ours[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not list(run_dir.glob("checkpoints/**/*.pt")), "a checkpoint of nothing trained"


def test_second_signal_ends_a_rank_stuck_in_setup(tmp_path):
    """One rank frozen in set-up: the others cannot agree on the first SIGTERM (the heartbeat
    needs every rank); the second ends each of them at once, and the launcher the job. Each round
    goes out once the previous one is delivered (no longer pending), not after a sleep."""
    # no heartbeat abort: signals only
    with held_in_setup(tmp_path, "run.hang_timeout=0") as (proc, run_dir, pids):
        os.kill(pids[3], signal.SIGSTOP)
        wait_for("rank 3 stopped", lambda: stopped(pids[3]), 30)
        for _ in range(2):
            for rank in (0, 1, 2):
                os.kill(pids[rank], signal.SIGTERM)
            wait_for(
                "SIGTERM delivered",
                lambda: not any(pending(pids[r], signal.SIGTERM) for r in (0, 1, 2)),
                30,
            )
        took, err = finish(proc, run_dir, 30)
    print(
        f"two SIGTERMs, one rank frozen in set-up -> launcher exited {proc.returncode} "
        f"after {took:.1f} s"
    )
    assert proc.returncode != 0 and "second SIGTERM: exiting now" in err, err[-3000:]


@pytest.mark.parametrize("target", ["terminal", "ranks"])
def test_ctrl_c_is_one_line_exit_130_and_no_rank_outlives_the_launcher(tmp_path, target):
    """terminal: SIGINT to the launcher's process group (Ctrl-C; mpirun asks the ranks to stop);
    ranks: SIGINT to every rank (srun passes Ctrl-C on to the tasks, or a rank run alone).
    The job ends within CTRL_C_S (a promise to users)."""
    run_dir = tmp_path / "run"
    command = train_command(run_dir, f"train.steps={UNBOUNDED}")
    launch = [sys.executable, "-m", "hvcodistill.launch", "-np", "4", *command]
    with training(launch, None, run_dir) as proc:
        if target == "terminal":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            for pid in rank_pids(run_dir).values():
                os.kill(pid, signal.SIGINT)
        took, err = finish(proc, run_dir, 60)
        left = rank_pids(run_dir)
    print(f"SIGINT ({target}) -> launcher exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, (
        err[-3000:]
    )
    assert not left, f"ranks {sorted(left)} outlived the launcher"
    assert "interrupted" in err and took < CTRL_C_S, (took, err[-3000:])
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
    launch = [
        sys.executable,
        "-m",
        "hvcodistill.launch",
        "-np",
        "4",
        *train_command(run_dir, f"train.steps={UNBOUNDED}"),
    ]
    with training(launch, None, run_dir) as proc:
        try:
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
import os, subprocess, sys
from hvcodistill.mpirun import become_subreaper, reap_orphans
assert become_subreaper()
linger = float(sys.argv[1])
# like mpirun exiting while a rank it killed still tears down: the parent goes, its child stays
subprocess.run(["sh", "-c", f"sleep {linger} & echo $! > {sys.argv[2]}"], check=True)
orphan = int(open(sys.argv[2]).read())
killed = reap_orphans(grace=float(sys.argv[3]))
# on return: is the orphan still there (neither ended nor reaped)?
print(len(killed), int(os.path.exists(f"/proc/{orphan}")))
"""


@pytest.mark.parametrize("linger, grace, killed", [(1, 30, 0), (600, 0.5, 1)])
def test_launcher_waits_for_what_mpirun_left_and_kills_it_after_a_grace(
    tmp_path, linger, grace, killed
):
    """The reason for `reap_orphans`: mpirun returned while a killed rank was still alive (CI).
    An orphan that ends within the grace is waited for (none killed, gone on return); one that
    would outlive it (600 s, against a 0.5 s grace and the test's 60 s limit) is killed. Counts
    and process states, no clock: each case's grace and linger are far apart."""
    pid_file = tmp_path / "pid"
    out = subprocess.run(
        [sys.executable, "-c", REAP_PROBE, str(linger), str(pid_file), str(grace)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    n, still_there = out.stdout.split()
    assert int(n) == killed, out
    assert still_there == "0", f"reap_orphans returned with the orphan still there: {out}"
    if killed:
        assert "outlived mpirun" in out.stderr, out.stderr
