"""A real, throw-away, one-machine SLURM cluster for the tests of tests/integration/*slurm*.py,
and a 2-node one on the emulated cluster (EmulatedSlurmCluster, root only) for test_slurm_nodes.py.

    cluster = SlurmCluster(workdir)   # writes munge key + slurm.conf under workdir
    cluster.start()                   # munged, slurmctld, slurmd (foreground, our own pids)
    job = cluster.sbatch(["slurm/codistill.sbatch"], env=..., wait=True)
    cluster.ensure_ready()            # whatever a test did: no job, every daemon up, nodes idle
    cluster.stop()                    # cancels jobs, then stops exactly the pids it started

Nothing system-wide is touched except installing the Debian packages when they are missing
(`ensure_installed`, root only): munged gets its own key and socket, the daemons their own
ports, state and spool directories, so a SLURM or munge already running on the machine is left
alone. The node declares more CPUs than the machine has (SlurmdParameters=config_overrides), so
a 4-task job fits on a 2-core CI box.

Also a pytest plugin (tests/conftest.py's pytest_plugins): the fixtures `slurm_cluster`, the
one-node cluster of the whole session, started once by the first test that asks for it and
stopped at the session's end (also after a failure or Ctrl-C), and `slurm`, that cluster made
ready before each test and emptied of jobs after it. And `Hold`: a run whose ranks wait before a
step, so that a test signals or breaks a run that cannot have finished.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

DAEMONS = ("slurmctld", "slurmd", "munged")
PACKAGES = ("slurm-wlm", "munge")
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_programs() -> list[str]:
    return [
        p
        for p in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo")
        if _which(p) is None
    ]


def ensure_installed() -> str | None:
    """Install slurm-wlm and munge with apt-get when missing. Returns None when ready, else why
    not."""
    if not missing_programs():
        return None
    if os.geteuid() != 0:
        return (
            f"SLURM is not installed ({', '.join(missing_programs())} missing) and installing it "
            f"needs root: apt-get install {' '.join(PACKAGES)}"
        )
    if shutil.which("apt-get") is None:
        return f"SLURM is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    if missing_programs():
        raise SlurmError(
            f"apt-get installed {' '.join(PACKAGES)} but {missing_programs()} are still missing"
        )
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
        os.chmod(self.dir, 0o700)  # munged refuses group/world-writable directories
        key = self.dir / "munge" / "munge.key"
        if not key.exists():  # a private key: any >= 32 random bytes will do
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        self.conf.write_text(self._conf_text())

    def _conf_text(self) -> str:
        """slurm.conf: the settings common to both clusters, then `_nodes_text()`."""
        d = self.dir
        return f"""\
# test cluster written by tests/slurm_cluster.py
ClusterName=hvtest
{self._controller_text()}
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
{self._tmpfs_text()}SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd{self._per_node}.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd{self._per_node}.log
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
SlurmdTimeout={self.slurmd_timeout}
MessageTimeout={self.message_timeout}
{self._nodes_text()}"""

    # one node, this machine's hostname, on the loopback address
    _per_node = ""  # slurmd pid and log file suffix (%n: the node's name, per slurmd)
    slurmd_timeout = 60
    message_timeout = 10  # SLURM's default

    def _controller_text(self) -> str:
        return f"SlurmctldHost={self.node}(127.0.0.1)"

    def _tmpfs_text(self) -> str:
        return ""

    def _nodes_text(self) -> str:
        return (
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN\n"
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
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
        raise SlurmError(
            f"timed out after {timeout or self.start_timeout:.0f}s waiting for {what}\n"
            f"{self.logs()}"
        )

    def start(self) -> "SlurmCluster":
        self._write_files()
        d = self.dir
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={d}/munge/munge.key",
                    f"--pid-file={d}/munge/munged.pid",
                    f"--log-file={d}/log/munged.log",
                    f"--seed-file={d}/munge/munged.seed",
                ],
            )
            self._wait_for("munged's socket", self.munge_socket.exists)
            self._spawn(
                "slurmctld",
                self._on(self.nodes[0], [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)]),
            )
            self._wait_for(
                "slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0
            )
            for node in self.nodes:
                self.start_slurmd(node)
            for node in self.nodes:
                self._wait_for(f"node {node} to be idle", lambda: self.node_state(node) == "idle")
        except BaseException:
            self.stop()
            raise
        return self

    def start_slurmd(self, node: str) -> None:
        (self.dir / "spool" / node).mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp" / node).mkdir(parents=True, exist_ok=True)
        self._spawn(
            self._slurmd_name(node),
            self._on(node, [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)]),
        )

    # where the daemons run: here all on this machine as it is (EmulatedSlurmCluster: in the nodes)
    @property
    def nodes(self) -> list[str]:
        return [self.node]

    def _slurmd_name(self, node: str) -> str:
        return "slurmd"

    def _on(self, node: str, argv: list[str]) -> list[str]:
        """argv that runs `argv` on `node`."""
        return argv

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (by pid), newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in (*map(self._slurmd_name, self.nodes), "slurmctld", "munged"):
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

    def _gone(self, name: str) -> bool:
        return name not in self.procs or self.procs[name].poll() is not None

    def revive(self, node: str, timeout: float = 60) -> None:
        """Start a node's slurmd again if it is gone (killed, or exited) and wait until SLURM
        takes the node back (ReturnToService=2 returns a node that was DOWN for not responding
        once it registers)."""
        name = self._slurmd_name(node)
        if self._gone(name):
            self.procs.pop(name, None)
            # as after a reboot with fresh local state: a killed slurmstepd leaves its PMIx
            # directory (TmpFS) and socket (spool) behind, named after the job step, which the
            # requeued job (same id, same step) would fail to create again
            for sub in ("tmp", "spool"):
                shutil.rmtree(self.dir / sub / node, ignore_errors=True)
            self.start_slurmd(node)
        self._wait_for(
            f"node {node} to come back",
            lambda: self.node_state(node) in ("idle", "mixed", "allocated"),
            timeout=timeout,
        )

    def ensure_ready(self, timeout: float = 120) -> None:
        """Ready for the next test, whatever the last one did: no job left, every daemon running
        (munged or slurmctld gone: the cluster starts over; a slurmd gone: it starts again) and
        every node idle (a drained or down node is resumed)."""
        if self._gone("munged") or self._gone("slurmctld"):
            self.stop()
            self.start()
            return
        self.cancel_all()
        for node in self.nodes:
            self.revive(node, timeout=timeout)
        for node in self.nodes:
            self._wait_for(
                f"node {node} to be idle", lambda node=node: self._idle(node), timeout=timeout
            )

    def _idle(self, node: str) -> bool:
        state = self.node_state(node)
        if any(word in state for word in ("drain", "down", "fail")):
            self.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
        return state == "idle"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ client commands
    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 60,
        env: dict | None = None,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess:
        full_env = dict(self.env, **(env or {}))
        full_env["SLURM_CONF"] = str(self.conf)
        proc = subprocess.run(
            self._on(self.nodes[0], argv),
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(map(str, argv))} exited {proc.returncode}\n--- stdout ---\n"
                f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}\n{self.logs()}"
            )
        return proc

    def node_state(self, node: str | None = None) -> str:
        out = self.run(
            ["sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T"], check=False
        ).stdout.strip()
        return out.splitlines()[0] if out else ""

    def mpi_plugins(self) -> set[str]:
        """What `srun --mpi=list` offers (e.g. {'none', 'pmi2', 'pmix', 'pmix_v4',
        'cray_shasta'})."""
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

    def sbatch(
        self,
        argv: list[str],
        *,
        env: dict | None = None,
        cwd: Path | str | None = None,
        wait: bool = False,
        timeout: float = 300,
    ) -> tuple[int, subprocess.CompletedProcess]:
        """Submit `sbatch --parsable argv...`; returns (job id, the finished sbatch process)."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *argv]
        proc = self.run(cmd, check=False, timeout=timeout, env=env, cwd=cwd)
        first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        if not first.split(";")[0].isdigit():
            raise SlurmError(
                f"{' '.join(cmd)} did not submit (exit {proc.returncode})\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return int(first.split(";")[0]), proc

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} when
        gone."""
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
        """Poll until the job is finished for good (or `until(fields)` holds); returns its
        fields."""
        until = until or (lambda f: f.get("JobState") in TERMINAL_STATES)
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive(f"waiting for job {job_id}")
            fields = self.job(job_id)
            if fields and until(fields):
                return fields
            time.sleep(0.5)
        raise SlurmError(
            f"job {job_id} still {fields.get('JobState')} after {timeout:.0f}s: {fields}\n"
            f"{self.logs()}"
        )

    def logs(self, n: int = 30) -> str:
        parts = []
        slurmds = list(map(self._slurmd_name, self.nodes))
        for name in (
            "munged.log",
            "slurmctld.log",
            *(f"{n}.log" for n in slurmds),
            "munged.stdout",
            "slurmctld.stdout",
            *(f"{n}.stdout" for n in slurmds),
        ):
            path = self.dir / "log" / name
            if path.exists() and path.stat().st_size:
                parts.append(f"--- {path} (last {n} lines) ---\n{_tail(path, n)}")
        return "\n".join(parts)


class EmulatedSlurmCluster(SlurmCluster):
    """SLURM on the emulated multi-node cluster of hvcodistill.cluster: one slurmd per node, each
    in its node's network namespace with the node's hostname (`slurmd -N nodeX`, NodeAddr
    198.18.0.x), and slurmctld on node0, the head node, as on a small cluster without a login node.
    Every client command (sbatch, scontrol, ...) runs on node0 too, so jobs are submitted from
    there. munged stays in the root namespace: its socket is a file, which every namespace sees.

        with EmulatedCluster(2, name=...) as nodes:
            cluster = EmulatedSlurmCluster(workdir, nodes).start()
            ...
            cluster.kill_node("node1")  # slurmd and every process in node1's namespace, SIGKILL
            cluster.stop()              # cancels jobs, stops the daemons, kills what the jobs left

    SlurmdTimeout and MessageTimeout are short (5 s each), so a node that stops answering is marked
    DOWN, and its jobs end (NODE_FAIL, requeued), within about 15 s rather than SLURM's default of
    5 minutes and more.
    """

    _per_node = "-%n"
    slurmd_timeout = 5
    message_timeout = 5

    def __init__(self, workdir: Path, emulated, *, cpus: int = 2, start_timeout: float = 30.0):
        super().__init__(workdir, cpus=cpus, start_timeout=start_timeout)
        self.emulated = emulated
        self.node = emulated.hosts[0]

    @property
    def nodes(self) -> list[str]:
        return list(self.emulated.hosts)

    def _slurmd_name(self, node: str) -> str:
        return f"slurmd-{node}"

    def _on(self, node: str, argv: list[str]) -> list[str]:
        """In `node`'s network namespace with its hostname, like EmulatedCluster.node_command, but
        entered with nsenter rather than `ip netns exec`, which remounts /sys and so hides the
        cgroup hierarchy under /sys/fs/cgroup that slurmd needs."""
        return [
            _which("nsenter") or "nsenter",
            f"--net=/run/netns/{self.emulated.namespace(node)}",
            _which("unshare") or "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {node}; exec "$@"',
            "sh",
            *map(str, argv),
        ]

    def _controller_text(self) -> str:
        return f"SlurmctldHost={self.nodes[0]}({self.emulated.address(self.nodes[0])})"

    def _tmpfs_text(self) -> str:
        # slurmstepd's PMIx plugin makes /tmp/spmix_appdir_<uid>_<step> on each node; the nodes
        # share this machine's /tmp, so each gets a TmpFS of its own (%n: the node's name)
        return f"TmpFS={self.dir}/tmp/%n\n"

    def _nodes_text(self) -> str:
        lines = [
            f"NodeName={n} NodeAddr={self.emulated.address(n)} CPUs={self.cpus} State=UNKNOWN"
            for n in self.nodes
        ]
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} "
            "Default=YES MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    def node_pids(self, node: str) -> list[int]:
        """Every process in `node`'s network namespace (its slurmd, the job steps, the ranks)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.emulated.namespace(node)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: str) -> None:
        """The node dies: SIGKILL to every process in its namespace, repeated until none is left
        (a dying slurmstepd may still fork)."""
        slurmd = self.procs.pop(self._slurmd_name(node), None)
        for _ in range(50):
            pids = self.node_pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
            if slurmd is not None:
                slurmd.poll()  # reap it
        raise SlurmError(
            f"processes left in {node}'s namespace after SIGKILL: {self.node_pids(node)}"
        )

    def stop(self) -> None:
        """As SlurmCluster.stop, then SIGKILL whatever is still running in the nodes' namespaces
        (only what the jobs started runs there), so the namespaces can go."""
        try:
            super().stop()
        finally:
            for node in self.nodes:
                self.kill_node(node)


# ---------------------------------------------------------------- jobs of slurm/codistill.sbatch
CODISTILL_SBATCH = ROOT / "slurm" / "codistill.sbatch"
QUIET = "train.epochs=0 train.progress=false train.eval_every=0"
# One node, 4 tasks of 1 CPU, no GPUs: command-line options override the scripts' #SBATCH lines.
ONE_NODE = [
    "--nodes=1",
    "--ntasks=4",
    "--ntasks-per-node=4",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=20",
]


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written)"


def submit(
    cluster: SlurmCluster,
    tmp_path: Path,
    *,
    launcher: str,
    overrides: str,
    script: Path = CODISTILL_SBATCH,
    resources: list[str] = ONE_NODE,
    config: str | None = "configs/digits_codistill.yaml",
    env: dict | None = None,
) -> tuple[int, Path, Path]:
    """sbatch `script` the way a user does, from a directory other than the repository (so the
    script must find the repository itself); CONFIG etc. travel in the environment
    (--export=ALL). Returns (job id, its run dir tmp_path/run, its output tmp_path/job.out)."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job_env = {
        "RUN_DIR": str(run_dir),
        "OVERRIDES": overrides,
        "LAUNCHER": launcher,
        "PYTHON": sys.executable,
        **({"CONFIG": config} if config else {}),
        **(env or {}),
    }
    job, _ = cluster.sbatch(
        [*resources, f"--output={out}", "--export=ALL", str(script)], env=job_env, cwd=tmp_path
    )
    return job, run_dir, out


def finished(
    cluster: SlurmCluster, job: int, out: Path, *, timeout: float = 240, until=None
) -> dict:
    """Wait for the job to end for good, or until `until(fields)` (polling scontrol: `sbatch
    --wait` polls with a doubling interval and would add up to a minute here); returns its
    scontrol fields."""
    try:
        return cluster.wait_job(job, timeout=timeout, until=until)
    except SlurmError as e:
        raise AssertionError(f"{e}\n--- job output ---\n{read(out)}") from None


def requeued(cluster: SlurmCluster, job: int, out: Path) -> dict:
    """Wait until the job has been requeued (Restarts >= 1) or ended; its fields."""
    return finished(
        cluster,
        job,
        out,
        timeout=120,
        until=lambda f: int(f.get("Restarts", "0")) >= 1 or f.get("JobState") in TERMINAL_STATES,
    )


def assert_completed(fields: dict, out: Path, cluster: SlurmCluster | None = None) -> str:
    """The job completed with exit 0; returns its output."""
    log = read(out)
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", (
        f"job {fields.get('JobId')} ended {fields.get('JobState')} {fields.get('ExitCode')}\n"
        f"{log}\n{cluster.logs() if cluster else ''}"
    )
    return log


def wait_for_training(
    cluster: SlurmCluster, job: int, run_dir: Path, out: Path, *, timeout: float = 180
) -> None:
    """Until the run has logged a step (metrics.jsonl): its ranks are past set-up and training."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert cluster.job(job).get("JobState") not in TERMINAL_STATES, (
            f"job ended before training began\n{read(out)}"
        )
        assert time.monotonic() < deadline, f"no metrics after {timeout:.0f}s\n{read(out)}"
        time.sleep(0.2)


# ---------------------------------------------------------------- fixtures (a pytest plugin)
@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node cluster of the whole session: installed if need be, started by the first
    test that asks for it, stopped (by pid) when the session ends, also after a failure or
    Ctrl-C; atexit stops it should the session end without its teardown."""
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="hvslurm-"))  # short: munged's socket path must fit
    cluster = SlurmCluster(workdir)
    atexit.register(cluster.stop)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster):
    """The session's cluster, ready before each test (no job, every daemon up, the node idle:
    a test may have preempted, requeued or failed a job, or lost a daemon) and emptied of jobs
    after it, so a failed test leaves none in the way."""
    slurm_cluster.ensure_ready()
    yield slurm_cluster
    slurm_cluster.cancel_all()


# ---------------------------------------------------------------- a run held before a step
HOLD_ENV = "HVCODISTILL_TEST_HOLD"
HELD_TRAIN = '''\
"""`python -m hvcodistill.train ARGS`, with one run held (tests/slurm_cluster.py, Hold): while
the file named by $HVCODISTILL_TEST_HOLD exists and reads "STEP RUN_DIR", each rank of RUN_DIR
waits before step STEP until it has been signalled (SIGUSR1/SIGTERM, as the preemption guard
records it) or the file is removed; only in a job's first attempt (SLURM_RESTART_COUNT unset
or 0), so a requeued job that resumes before STEP goes on. Any other run goes on as usual."""

import os
import sys
import time
from pathlib import Path


def hold(args):
    path = os.environ.get("HVCODISTILL_TEST_HOLD", "")
    if not path or not os.path.exists(path) or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return
    step, run_dir = Path(path).read_text().split(maxsplit=1)
    ours = [a.split("=", 1)[1] for a in args if a.startswith("run.dir=")]
    if not ours or Path(ours[-1]).resolve() != Path(run_dir.strip()):
        return
    from hvcodistill.comm.preemption import PreemptionGuard
    from hvcodistill.training import loop

    signalled = []
    handle, train_step = PreemptionGuard._handle, loop.train_step

    def noting_handle(self, signum, frame):
        signalled.append(signum)
        handle(self, signum, frame)

    def held_step(tr, i, x, y):
        if i == int(step):
            while not signalled and os.path.exists(path):
                time.sleep(0.05)
        return train_step(tr, i, x, y)

    PreemptionGuard._handle, loop.train_step = noting_handle, held_step


if __name__ == "__main__":
    if sys.argv[1:3] != ["-m", "hvcodistill.train"]:
        sys.exit(f"{sys.argv[0]}: expected -m hvcodistill.train ARGS, got {sys.argv[1:]}")
    sys.path[0] = os.getcwd()  # as under `python -m`
    hold(sys.argv[3:])
    from hvcodistill import train

    sys.exit(train.main(sys.argv[3:]))
'''


class Hold:
    """A run whose ranks wait before `step` until each is signalled or the test releases them,
    so a test signals (or kills a node of) a run that cannot have finished first, however fast
    the machine (a signal may still come earlier: the run stops there). Pass `env` to the job:
    PYTHON, which codistill.sbatch starts the ranks with, is a wrapper of this interpreter that
    holds the run whose run.dir is `run_dir`, and only that one (a study's other runs go on), in
    the job's first attempt only (a requeued job is never held).

        hold = Hold(tmp_path, tmp_path / "run", step=20)
        job = cluster.sbatch([...], env={**env, **hold.env})
        ... the run has logged step 10 and waits before step 20: signal it ...
        hold.release()   # every rank goes on, signalled or not
    """

    def __init__(self, directory: Path, run_dir: Path, *, step: int):
        directory = Path(directory)
        self.file = directory / "hold"
        self.file.write_text(f"{step} {Path(run_dir).resolve()}\n")
        script = directory / "held_train.py"
        script.write_text(HELD_TRAIN)
        python = directory / "held_python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
        python.chmod(0o755)
        self.env = {"PYTHON": str(python), HOLD_ENV: str(self.file)}

    def release(self) -> None:
        self.file.unlink(missing_ok=True)
