"""The emulated cluster itself: its nodes, switch and launch agent, built and taken down from a
record of what was made, and the mpirun command line that runs ranks across its nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from hvcodistill.cluster.shaping import format_rate, parse_delay, parse_rate, qdisc_commands
from hvcodistill.cluster.system import ClusterError, check_netem, first_line, require_host, run
from hvcodistill.errors import ConfigError
from hvcodistill.mpirun import launch_environment

STATE_DIR = Path("/run/hvcodistill-cluster")
SUBNET = "198.18.0.0/24"  # inside the benchmarking range 198.18.0.0/15 (RFC 2544)
MAX_NODES = 250  # .1 .. .250 of the /24
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")
OOB_KEEPALIVE = [
    "--mca",
    "oob_tcp_keepalive_time",
    "5",
    "--mca",
    "oob_tcp_keepalive_intvl",
    "2",
    "--mca",
    "oob_tcp_keepalive_probes",
    "3",
]


def agent_script(name: str, hosts: list[str], namespaces: list[str], ip: str, unshare: str) -> str:
    """The plm_rsh_agent: Open MPI calls it like ssh, `agent [options] HOST COMMAND-WORDS...`.

    As ssh does, the command words are joined with spaces and run by a shell, here inside HOST's
    network namespace and a new UTS namespace named HOST (so the orted there reports HOST)."""
    cases = "\n".join(f"  {h}) ns={ns} ;;" for h, ns in zip(hosts, namespaces))
    return f"""#!/bin/sh
# Launch agent of the emulated cluster '{name}' (written by `python -m hvcodistill.cluster up`).
# Open MPI runs it as ssh: [options] HOST COMMAND...; no options are passed unless the agent's
# name is ssh, but skip any so that `agent -x HOST ...` works too.
while [ $# -gt 0 ]; do case $1 in -*) shift ;; *) break ;; esac; done
host=$1; shift
case $host in
{cases}
  *) echo "hvcodistill cluster agent: no host '$host' in cluster '{name}' ({" ".join(hosts)})" >&2
     exit 255 ;;
esac
exec {ip} netns exec "$ns" {unshare} --uts sh -c "hostname $host; $*"
"""


class EmulatedCluster:
    """`nodes` emulated nodes node0..node{n-1}.

    with EmulatedCluster(2, rate="1gbit") as c: ..."""

    def __init__(
        self,
        nodes: int = 2,
        *,
        name: str = "hvc",
        rate: str | None = None,
        delay: str | None = None,
        mtu: int = 9000,
        state_dir: Path = STATE_DIR,
    ):
        if not 1 <= int(nodes) <= MAX_NODES:
            raise ConfigError(f"nodes={nodes}: need 1..{MAX_NODES}")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"bad cluster name {name!r}: letters, digits and '-', at most 32")
        if not 576 <= int(mtu) <= 65535:
            raise ConfigError(f"mtu={mtu}: need 576..65535")
        self.name, self.mtu, self.state_dir = name, int(mtu), Path(state_dir)
        self.rate_bits, self.delay = parse_rate(rate), parse_delay(delay)
        self.hosts = [f"node{i}" for i in range(int(nodes))]

    # names and addresses: pure, the same before and after `up`
    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    @property
    def agent(self) -> Path:
        return self.state_dir / f"{self.name}-agent.sh"

    @property
    def switch(self) -> str:
        return f"hvc_{self.name}_switch"

    def namespace(self, host: str) -> str:
        return f"hvc_{self.name}_{host}"

    def address(self, host: str) -> str:
        return f"198.18.0.{self.hosts.index(host) + 1}"

    def port(self, host: str) -> str:
        """The switch-side end of `host`'s link (its bridge port)."""
        return f"port{self.hosts.index(host)}"

    def node_command(self, host: str, command: list[str]) -> list[str]:
        """argv that runs `command` on `host`: in its network namespace, with its hostname."""
        return [
            shutil.which("ip") or "ip",
            "netns",
            "exec",
            self.namespace(host),
            shutil.which("unshare") or "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {host}; exec "$@"',
            "sh",
            *command,
        ]

    # ---- lifecycle
    @classmethod
    def attach(cls, name: str = "hvc", state_dir: Path = STATE_DIR) -> "EmulatedCluster":
        """The cluster `name` that is up, from its record."""
        record = _load(Path(state_dir) / f"{name}.json")
        if record is None:
            raise ConfigError(
                f"no cluster {name!r} is up (python -m hvcodistill.cluster up --nodes N)"
            )
        if not record.get("complete"):
            raise ConfigError(
                f"cluster {name!r} is half-built (an up that did not finish); "
                f"python -m hvcodistill.cluster down --name {name}"
            )
        return cls(
            len(record["hosts"]),
            name=name,
            rate=format_rate(record["rate_bits"]),
            delay=record["delay"],
            mtu=record["mtu"],
            state_dir=state_dir,
        )

    def up(self, *, replace: bool = False) -> "EmulatedCluster":
        require_host()
        if self.delay:
            check_netem()
        if self.state_file.exists():
            if not replace:
                raise ConfigError(
                    f"cluster {self.name!r} is already up ({self.state_file}); "
                    "run down first or pass --replace"
                )
            self.down()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Written after every step, so that a `down` after a crash half-way undoes what was made.
        self._record = {
            "name": self.name,
            "hosts": self.hosts,
            "namespaces": [],
            "ports": [],
            "addresses": [self.address(h) for h in self.hosts],
            "agent": None,
            "rate_bits": self.rate_bits,
            "delay": self.delay,
            "mtu": self.mtu,
            "complete": False,
        }
        self._save()
        ok = False
        try:
            self._add_namespace(self.switch)
            run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for host in self.hosts:
                self._add_node(host)
            self._write_agent()
            self.shape(format_rate(self.rate_bits), self.delay)
            self._record["complete"] = True
            self._save()
            ok = True
        finally:
            if not ok:
                self.down(quiet=True)
        print(
            f"hvcodistill.cluster: {self.name!r} up: {self.hosts[0]}..{self.hosts[-1]} "
            f"({self.address(self.hosts[0])}..{self.address(self.hosts[-1])}), "
            f"{format_rate(self.rate_bits)}"
            f"{', delay ' + self.delay if self.delay else ''}, mtu {self.mtu}",
            file=sys.stderr,
        )
        return self

    def _add_namespace(self, ns: str) -> None:
        proc = run(["ip", "netns", "add", ns], check=False)
        if proc.returncode != 0:
            hint = (
                "; a leftover? remove it with `ip netns del " + ns + "`"
                if "exists" in proc.stderr
                else ""
            )
            raise ClusterError(f"cannot create namespace {ns}: {first_line(proc.stderr)}{hint}")
        self._record["namespaces"].append(
            ns
        )  # recorded only once it exists: never delete what we did not make
        self._save()
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _add_node(self, host: str) -> None:
        ns, port = self.namespace(host), self.port(host)
        self._add_namespace(ns)
        # Both ends are created directly in their namespaces: nothing appears in the root namespace.
        run(
            [
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                port,
                "mtu",
                str(self.mtu),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                str(self.mtu),
                "netns",
                ns,
            ]
        )
        self._record["ports"].append(port)
        self._save()
        run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # TCP would restart slow-start on a connection idle for one round trip, i.e. before every
        # exchange that follows a compute phase; MPI-over-TCP clusters turn that off (and RDMA has
        # no such thing), so the link's rate, not a transport artifact, sets what an exchange takes.
        run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 0 > /proc/sys/net/ipv4/tcp_slow_start_after_idle",
            ]
        )

    def _write_agent(self) -> None:
        self._record["agent"] = str(self.agent)
        self._save()
        self.agent.write_text(
            agent_script(
                self.name,
                self.hosts,
                [self.namespace(h) for h in self.hosts],
                shutil.which("ip"),
                shutil.which("unshare"),
            )
        )
        self.agent.chmod(0o755)

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._record, indent=1) + "\n")
        tmp.replace(self.state_file)

    def down(self, *, quiet: bool = False) -> None:
        """Remove exactly what the record lists (a namespace goes with its veths and bridge)."""
        require_host()
        record = _load(self.state_file)
        if record is None:
            if not quiet:
                print(
                    f"hvcodistill.cluster: no cluster {self.name!r} is up; nothing to do",
                    file=sys.stderr,
                )
            return
        for ns in reversed(record.get("namespaces", [])):
            run(["ip", "netns", "del", ns], check=False)
        if record.get("agent"):
            Path(record["agent"]).unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
        if not quiet:
            print(f"hvcodistill.cluster: {self.name!r} down", file=sys.stderr)

    def __enter__(self) -> "EmulatedCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down(quiet=True)

    # ---- running cluster
    def shape(self, rate: str | None, delay: str | None = None) -> None:
        """Set every link to `rate` (None/'none': unshaped) and `delay`, both ways, in place."""
        require_host()
        rate_bits, delay = parse_rate(rate), parse_delay(delay)
        if delay:
            check_netem()
        for host in self.hosts:
            for ns, dev in ((self.namespace(host), "eth0"), (self.switch, self.port(host))):
                # Deleting the root qdisc fails harmlessly when the device has its default one.
                run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                for args in qdisc_commands(dev, rate_bits, delay, self.mtu):
                    run(["tc", "-n", ns, *args])
        self.rate_bits, self.delay = rate_bits, delay
        record = _load(self.state_file)
        if record is not None:
            self._record = {**record, "rate_bits": rate_bits, "delay": delay}
            self._save()

    def counters(self) -> dict[str, dict[str, int]]:
        """host -> {"tx_bytes", "rx_bytes"} of its eth0, as the kernel counts them (L2 frames)."""
        require_host()
        out = {}
        for host in self.hosts:
            proc = run(["ip", "-n", self.namespace(host), "-s", "-j", "link", "show", "eth0"])
            stats = json.loads(proc.stdout)[0]["stats64"]
            out[host] = {
                "tx_bytes": int(stats["tx"]["bytes"]),
                "rx_bytes": int(stats["rx"]["bytes"]),
            }
        return out

    def mpirun_command(
        self,
        np: int,
        command: list[str],
        *,
        slots: int | None = None,
        env: dict | None = None,
        extra: list[str] | None = None,
    ) -> tuple[list[str], dict]:
        """argv and environment that run `np` ranks of `command` from mpirun on node0 (under
        `python -m hvcodistill.launch --supervise`), `slots` per node (default ceil(np / nodes));
        ranks fill node0 first (node0 holds ranks 0..slots-1)."""
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise ConfigError("no mpirun on PATH (make setup installs Open MPI)")
        slots = slots or -(-np // len(self.hosts))
        if np < 1 or slots < 1 or np > slots * len(self.hosts):
            raise ConfigError(f"-np {np} does not fit {len(self.hosts)} nodes x {slots} slots")
        run_env = launch_environment(os.environ)  # not what an enclosing MPI process left
        # Every emulated node shares this machine's cores: more ranks than cores busy-poll unless
        # Open MPI yields when idle (see hvcodistill.launch); one OpenMP thread per rank.
        run_env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        run_env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // np)))
        # train.backend=torch: the node names resolve nowhere, so rank 0's rendezvous is node0's
        # address and gloo binds each node's eth0 (the link the byte counters watch)
        run_env.setdefault("MASTER_ADDR", self.address(self.hosts[0]))
        run_env.setdefault("GLOO_SOCKET_IFNAME", "eth0")
        run_env.update({k: str(v) for k, v in (env or {}).items()})
        argv = [
            mpirun,
            "-np",
            str(np),
            "--host",
            ",".join(f"{h}:{slots}" for h in self.hosts),
            "--map-by",
            "slot",
            "--bind-to",
            "none",
            "--oversubscribe",
            "--allow-run-as-root",
            "--mca",
            "plm_rsh_agent",
            str(self.agent),
            # mpirun starts every orted itself through the agent (no tree spawn from other nodes).
            "--mca",
            "plm_rsh_no_tree_spawn",
            "1",
            "--mca",
            "btl",
            "tcp,self,vader",
            "--mca",
            "btl_tcp_if_include",
            SUBNET,
            "--mca",
            "oob_tcp_if_include",
            SUBNET,
            # mpirun <-> orted: a node that stops answering (its link cut) is declared lost after
            # 5 s idle + 3 unanswered probes 2 s apart, and mpirun ends the job, rather than wait
            # on TCP for many minutes (the ranks' own heartbeat: comm/watchdog.py).
            *OOB_KEEPALIVE,
            # Pin MPI_Allreduce to the ring (tuned algorithm 4): its traffic per link is known,
            # 2 (W-1)/W x the buffer from each rank to the next, so the byte counters can be
            # checked against it. Open MPI's default picks by message size and mixes algorithms.
            "--mca",
            "coll_tuned_use_dynamic_rules",
            "1",
            "--mca",
            "coll_tuned_allreduce_algorithm",
            "4",
        ]
        names = [
            "PATH",
            "PYTHONPATH",
            "OMP_NUM_THREADS",
            "OMPI_MCA_mpi_yield_when_idle",
            "MASTER_ADDR",
            "GLOO_SOCKET_IFNAME",
            *(env or {}),
        ]
        for var in dict.fromkeys(names):
            if var in run_env:
                argv += ["-x", var]
        # On node0 mpirun runs under hvcodistill.launch's supervisor, as a local launch does:
        # signals reach mpirun once, and the command returns only when none of node0's ranks is
        # left (mpirun can exit on a lost node while a rank it killed still tears down).
        supervised = [
            sys.executable,
            "-m",
            "hvcodistill.launch",
            "--supervise",
            *argv,
            *(extra or []),
            *command,
        ]
        return self.node_command(self.hosts[0], supervised), run_env

    def describe(self) -> str:
        """Lines for `status`: hosts, addresses, shaping and byte counters."""
        lines = [
            f"cluster {self.name!r}: {self.hosts[0]}..{self.hosts[-1]}, "
            f"{format_rate(self.rate_bits)} each way"
            f"{', delay ' + self.delay if self.delay else ''}, mtu {self.mtu}; agent {self.agent}"
        ]
        for host, c in self.counters().items():
            lines.append(
                f"  {host:8} {self.address(host):12} ns {self.namespace(host):24} "
                f"tx {c['tx_bytes']:>14,} B  rx {c['rx_bytes']:>14,} B"
            )
        return "\n".join(lines)


def clusters_up(state_dir: Path = STATE_DIR) -> list[str]:
    """Names of the clusters with a record in `state_dir`."""
    return sorted(p.stem for p in Path(state_dir).glob("*.json"))


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
