"""Start N ranks on this machine with mpirun, with the settings a laptop or CI box needs.

    python -m hvcodistill.launch -np 4 python -m hvcodistill.train --config configs/digits_codistill.yaml

- more ranks than cores: `--oversubscribe` and `OMPI_MCA_mpi_yield_when_idle=1`; without the latter
  Open MPI busy-polls and a 4-rank Horovod loop on 2 cores runs ~15x slower (18 vs 277 steps/s);
- as root (containers, CI): `--allow-run-as-root`;
- one thread per rank for torch/OpenMP unless set, so ranks do not fight over cores.
On a cluster use srun or horovodrun instead (see slurm/ and README.md).
"""
from __future__ import annotations

import argparse
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
_INHERITED_PREFIXES = ("PMIX_", "ORTE_", "OMPI_COMM_WORLD_", "OMPI_APP_CTX_", "OMPI_MCA_ess", "OMPI_MCA_orte_ess_",
                       "OMPI_MCA_pmix")
_INHERITED_NAMES = {"OMPI_MCA_orte_launch", "OMPI_MCA_orte_precondition_transports", "OMPI_MCA_orte_hnp_uri",
                    "OMPI_MCA_orte_local_daemon_uri", "OMPI_UNIVERSE_SIZE", "OMPI_FIRST_RANKS",
                    "OMPI_NUM_APP_CTX", "OMPI_FILE_LOCATION", "OMPI_MCA_initial_wdir"}


def launch_environment(environ) -> dict:
    """`environ` without what an enclosing MPI job or singleton left (see above)."""
    return {k: v for k, v in environ.items()
            if not k.startswith(_INHERITED_PREFIXES) and k not in _INHERITED_NAMES}


def mpirun_command(np: int, command: list[str], *, extra: list[str] | None = None) -> tuple[list[str], dict]:
    """The mpirun argv and environment that start `np` local ranks of `command`."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("hvcodistill.launch: error: no mpirun on PATH (make setup installs Open MPI)")
    env = launch_environment(os.environ)
    argv = [mpirun, "-np", str(np), "--bind-to", "none"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvcodistill.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", type=int, help="number of ranks")
    p.add_argument("--supervise", action="store_true",
                   help="the command is a whole mpirun command line: run it as given, with the same signal "
                        "forwarding and reaping of the local ranks (hvcodistill.cluster runs mpirun this way)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command each rank runs")
    args = p.parse_args(argv)
    if not args.command:
        p.error("need a command")
    if args.supervise:
        if args.np is not None:
            p.error("--supervise takes the whole mpirun command line; -np goes in it")
        return run_forwarding_signals(args.command, dict(os.environ))
    if args.np is None or args.np < 1:
        p.error("need -np >= 1 and a command")
    cmd, env = mpirun_command(args.np, args.command)
    return run_forwarding_signals(cmd, env)


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
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_own_group_ended_with_parent())
    got = []

    def forward(signum, frame):
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        rc = proc.wait()
        # mpirun can exit while a rank it killed is still tearing down (seen in CI: a rank alive
        # after the launcher had exited 130); as subreaper this process inherits and waits for it.
        reap_orphans()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGINT in got:
        print(f"hvcodistill.launch: interrupted (mpirun exited {rc})", file=sys.stderr, flush=True)
        return 130
    return 128 - rc if rc < 0 else rc                   # killed by a signal: as a shell says it


def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        import ctypes
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
            prctl(1, int(signal.SIGTERM), 0, 0, 0)                           # PR_SET_PDEATHSIG
    return preexec


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux prctl PR_SET_CHILD_SUBREAPER).

    mpirun puts each rank in a process group of its own, and can exit while a rank it killed is
    still tearing down; the rank then becomes a child of this process, which can wait for it."""
    prctl = _prctl()
    return prctl is not None and prctl(36, 1, 0, 0, 0) == 0              # PR_SET_CHILD_SUBREAPER


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
    SIGKILL the rest. Returns the pids that had to be killed (and says so): none in a healthy run."""
    deadline, killed = time.monotonic() + grace, []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return killed                                 # no child left
        if pid:
            continue
        if time.monotonic() >= deadline and not killed:
            killed = children()
            if killed:
                print(f"hvcodistill.launch: {len(killed)} process(es) outlived mpirun by {grace:.0f} s; killing "
                      f"{' '.join(map(str, killed))}", file=sys.stderr, flush=True)
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not killed:
                return killed
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
