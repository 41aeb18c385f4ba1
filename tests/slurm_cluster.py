"""A real, throw-away, one-machine SLURM cluster for the tests in test_slurm.py.

    cluster = SlurmCluster(workdir)   # writes munge key + slurm.conf under workdir
    cluster.start()                   # munged, slurmctld, slurmd (foreground, our own pids)
    job = cluster.sbatch(["slurm/codistill.sbatch"], env=..., wait=True)
    cluster.stop()                    # cancels jobs, then stops exactly the pids it started

Nothing system-wide is touched except installing the Debian packages when they are missing
(`ensure_installed`, root only): munged gets its own key and socket, the daemons their own
ports, state and spool directories, so a SLURM or munge already running on the machine is left
alone. The node declares more CPUs than the machine has (SlurmdParameters=config_overrides), so
a 4-task job fits on a 2-core CI box.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
PACKAGES = ("slurm-wlm", "munge")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_programs() -> list[str]:
    return [p for p in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo") if _which(p) is None]


def ensure_installed() -> str | None:
    """Install slurm-wlm and munge with apt-get when missing. Returns None when ready, else why not."""
    if not missing_programs():
        return None
    if os.geteuid() != 0:
        return (f"SLURM is not installed ({', '.join(missing_programs())} missing) and installing it "
                f"needs root: apt-get install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        return f"SLURM is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if missing_programs():
        raise SlurmError(f"apt-get installed {' '.join(PACKAGES)} but {missing_programs()} are still missing")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not written)"
    return "\n".join(lines[-n:])


class SlurmCluster:
    def __init__(self, workdir: Path, *, cpus: int = 4, start_timeout: float = 30.0):
        self.dir = Path(workdir)
        self.cpus = cpus
        self.start_timeout = start_timeout
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"

    # ------------------------------------------------------------------ set-up
    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir / sub, 0o700)
        os.chmod(self.dir, 0o700)            # munged refuses group/world-writable directories
        key = self.dir / "munge" / "munge.key"
        if not key.exists():                  # a private key: any >= 32 random bytes will do
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        d, node = self.dir, self.node
        self.conf.write_text(f"""\
# one-node test cluster written by tests/slurm_cluster.py
ClusterName=hvtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after this (default 120 s, minimum 5)
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# look at pending jobs every second, not every 60 s: a requeued job starts as soon as it may
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# keep finished jobs visible to `scontrol show job` (no slurmdbd here, so no sacct)
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def _check_alive(self, what: str) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited {proc.returncode} while {what}\n{self.logs()}")

    def _wait_for(self, what: str, ready, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            self._check_alive(f"waiting for {what}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout or self.start_timeout:.0f}s waiting for {what}\n{self.logs()}")

    def start(self) -> "SlurmCluster":
        self._write_files()
        d = self.dir
        try:
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--socket={self.munge_socket}", f"--key-file={d}/munge/munge.key",
                                   f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                                   f"--seed-file={d}/munge/munged.seed"])
            self._wait_for("munged's socket", self.munge_socket.exists)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._wait_for("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0)
            (d / "spool" / self.node).mkdir(parents=True, exist_ok=True)
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait_for(f"node {self.node} to be idle", lambda: self.node_state() == "idle")
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (by pid), newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this (private) cluster and wait until none is left running."""
        squeue = ["squeue", "-h", "-o", "%i"]
        jobs = self.run(squeue, check=False).stdout.split()
        if not jobs:
            return
        self.run(["scancel", *jobs], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run(squeue, check=False).stdout.split():
            time.sleep(0.5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ client commands
    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        full_env = dict(self.env, **(env or {}))
        full_env["SLURM_CONF"] = str(self.conf)
        proc = subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, argv))} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}\n{self.logs()}")
        return proc

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], check=False).stdout.strip()
        return out.splitlines()[0] if out else ""

    def mpi_plugins(self) -> set[str]:
        """What `srun --mpi=list` offers (e.g. {'none', 'pmi2', 'pmix', 'pmix_v4', 'cray_shasta'})."""
        out = self.run(["srun", "--mpi=list"], check=False)
        text = out.stdout + out.stderr
        names = set()
        for line in text.splitlines():
            line = line.strip().removeprefix("srun:").strip()
            if line.startswith("MPI plugin types are") or not line:
                continue
            if line.startswith("specific pmix plugin versions"):
                continue
            names.add(line.split()[0].rstrip(","))
        return names

    def sbatch(self, argv: list[str], *, env: dict | None = None, cwd: Path | str | None = None,
               wait: bool = False, timeout: float = 300) -> tuple[int, subprocess.CompletedProcess]:
        """Submit `sbatch --parsable argv...`; returns (job id, the finished sbatch process)."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *argv]
        proc = self.run(cmd, check=False, timeout=timeout, env=env, cwd=cwd)
        first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        if not first.split(";")[0].isdigit():
            raise SlurmError(f"{' '.join(cmd)} did not submit (exit {proc.returncode})\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return int(first.split(";")[0]), proc

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} when gone."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        fields = {}
        for item in proc.stdout.split():
            key, sep, value = item.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_job(self, job_id: int, *, timeout: float = 300, until=None) -> dict[str, str]:
        """Poll until the job is finished for good (or `until(fields)` holds); returns its fields."""
        until = until or (lambda f: f.get("JobState") in TERMINAL_STATES)
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive(f"waiting for job {job_id}")
            fields = self.job(job_id)
            if fields and until(fields):
                return fields
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f}s: {fields}\n{self.logs()}")

    def logs(self, n: int = 30) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout",
                     "slurmd.stdout"):
            path = self.dir / "log" / name
            if path.exists() and path.stat().st_size:
                parts.append(f"--- {path} (last {n} lines) ---\n{_tail(path, n)}")
        return "\n".join(parts)
