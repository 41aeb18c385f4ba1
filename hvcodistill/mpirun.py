"""Starting ranks with mpirun on one machine, and supervising them: the command line and
environment a laptop or CI box needs, signal forwarding, and reaping ranks that outlive mpirun.
The launcher (`python -m hvcodistill.launch`), the demo, the benchmark, the study runner and
the emulated cluster all start ranks through here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

# What an enclosing MPI process leaves in the environment: a Python session that initialised MPI
# as a singleton (importing mpi4py.MPI does) sets these at the C level, and every child started
# without an explicit environment inherits them. A new mpirun that sees them takes itself for a
# client of that (finished) job and exits 1 without a word. User tuning (OMPI_MCA_btl_*, ...) stays.
_INHERITED_PREFIXES = (
    "PMIX_",
    "ORTE_",
    "OMPI_COMM_WORLD_",
    "OMPI_APP_CTX_",
    "OMPI_MCA_ess",
    "OMPI_MCA_orte_ess_",
    "OMPI_MCA_pmix",
)
_INHERITED_NAMES = {
    "OMPI_MCA_orte_launch",
    "OMPI_MCA_orte_precondition_transports",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_MCA_orte_local_daemon_uri",
    "OMPI_UNIVERSE_SIZE",
    "OMPI_FIRST_RANKS",
    "OMPI_NUM_APP_CTX",
    "OMPI_FILE_LOCATION",
    "OMPI_MCA_initial_wdir",
}


def launch_environment(environ) -> dict:
    """`environ` without what an enclosing MPI job or singleton left (see above)."""
    return {
        k: v
        for k, v in environ.items()
        if not k.startswith(_INHERITED_PREFIXES) and k not in _INHERITED_NAMES
    }


def mpirun_command(
    np: int, command: list[str], *, extra: list[str] | None = None
) -> tuple[list[str], dict]:
    """The mpirun argv and environment that start `np` local ranks of `command`."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit(
            "hvcodistill.launch: error: no mpirun on PATH (make setup installs Open MPI)"
        )
    env = launch_environment(os.environ)
    argv = [mpirun, "-np", str(np), "--bind-to", "none"]
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    if np > cores:
        argv.append("--oversubscribe")
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // np)))
    # Pass the variables the ranks need through mpirun (-x), as on a multi-node launch.
    for var in ("OMPI_MCA_mpi_yield_when_idle", "OMP_NUM_THREADS", "PYTHONPATH", "PATH"):
        if var in env:
            argv += ["-x", var]
    return argv + list(extra or []) + list(command), env


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run mpirun until it exits, passing it every stop signal this process gets, exactly once.

    mpirun runs in its own process group, so Ctrl-C in a terminal (or `timeout`, which signals its
    whole group) reaches only this process, which forwards it: a signal sent to this pid alone
    behaves the same, and mpirun never gets one twice (twice means "kill the ranks at once" to it).
    mpirun turns SIGINT/SIGTERM into SIGTERM to every rank (SIGKILL a second later) and forwards
    SIGUSR1/SIGUSR2. Its stdin is /dev/null: a background process group must not read the
    terminal. It returns only when no local rank is left (see `reap_orphans`). After SIGINT this
    prints one line and exits 130.
    """
    become_subreaper()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_own_group_ended_with_parent()
    )
    got = []

    def forward(signum, frame):
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        rc = proc.wait()
        # mpirun can exit while a rank it killed is still tearing down; as subreaper this process
        # inherits that rank and waits for it.
        reap_orphans()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGINT in got:
        print(f"hvcodistill.launch: interrupted (mpirun exited {rc})", file=sys.stderr, flush=True)
        return 130
    return 128 - rc if rc < 0 else rc  # killed by a signal: as a shell says it


def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _own_group_ended_with_parent():
    """A preexec_fn for mpirun: a process group of its own (see run_forwarding_signals), and SIGTERM
    when this process dies (Linux PR_SET_PDEATHSIG), so that a launcher killed outright (SIGKILL,
    which it cannot forward) still ends mpirun, which ends the ranks as on a preemption. libc is
    loaded here, before the fork, so the child only calls into it."""
    prctl = _prctl()

    def preexec():
        os.setpgrp()
        if prctl is not None:
            prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER).

    mpirun puts each rank in a process group of its own, and can exit while a rank it killed is
    still tearing down; the rank then becomes a child of this process, which can wait for it."""
    prctl = _prctl()
    return prctl is not None and prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def children() -> list[int]:
    """Live (not zombie) children of this process, from /proc; [] where there is no /proc."""
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == me and fields[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def reap_orphans(grace: float = 10.0) -> list[int]:
    """Wait up to `grace` seconds for every child left (the ranks mpirun left behind) to end, then
    SIGKILL the rest. Returns the pids that had to be killed (and says so): none in a healthy
    run."""
    deadline, killed = time.monotonic() + grace, []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return killed  # no child left
        if pid:
            continue
        if time.monotonic() >= deadline and not killed:
            killed = children()
            if killed:
                print(
                    f"hvcodistill.launch: {len(killed)} process(es) outlived mpirun by "
                    f"{grace:.0f} s; killing {' '.join(map(str, killed))}",
                    file=sys.stderr,
                    flush=True,
                )
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not killed:
                return killed
        time.sleep(0.05)
