"""The emulated cluster: real namespaces, tc shaping and mpirun across nodes (root only).

The tests of `up` and `down` build their own clusters, each with its own name and always taken
down; the others share the module's cluster (conftest's `cluster`) and re-shape it. No test bounds
a time: a shaped link is seen by tc's settings and by its shaper's counters (the packets it held
back), never by a transfer's speed, which a loaded machine changes both ways (a receiver that is
not scheduled finds much of a transfer already buffered when it reads its first byte).
"""

import json
import shutil
import subprocess
import sys
import time

import pytest

from hvcodistill import cluster as C
from hvcodistill.cluster import EmulatedCluster, parse_delay, parse_rate, qdisc_commands, tbf_burst
from hvcodistill.errors import ConfigError
from tests.helpers import MPI_DIR, ROOT, needs_cluster, our_namespaces, unique_name


def cli(*args, user=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hvcodistill.cluster", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


# ---------------------------------------------------------------- pure helpers (no root)


def test_parse_rate_and_delay():
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1gbit") == parse_rate("1000mbit") == 10**9
    assert parse_rate("2.5Gbit") == 2_500_000_000
    assert parse_rate("none") is parse_rate("unshaped") is parse_rate(None) is None
    for bad in ("fast", "100mbps", "0mbit", "-1gbit", "1 gigabit"):
        with pytest.raises(ConfigError, match="bad rate"):
            parse_rate(bad)
    assert parse_delay("100us") == "100us" and parse_delay("1.5ms") == "1.5ms"
    assert parse_delay("none") is parse_delay("0") is parse_delay(None) is None
    with pytest.raises(ConfigError, match="bad delay"):
        parse_delay("100")


def test_tbf_burst_and_qdisc_commands():
    assert tbf_burst(10_000_000, 9000) == 64 * 1024  # slow: the 64 KiB floor
    assert tbf_burst(100_000_000, 9000) == 125_000  # 10 ms of bytes from ~52 Mbit/s on
    assert tbf_burst(10 * 10**9, 9000) == 12_500_000  # fast: 10 ms of bytes
    assert tbf_burst(10**6, 65535) == 2 * (65535 + 14)  # never below two frames
    assert qdisc_commands("eth0", None, None, 9000) == []
    (tbf,) = qdisc_commands("eth0", 10**9, None, 9000)
    assert tbf[:6] == ["qdisc", "add", "dev", "eth0", "root", "handle"] and "tbf" in tbf
    netem, child = qdisc_commands("eth0", 10**9, "100us", 9000)
    assert netem[-3:] == ["netem", "delay", "100us"]
    assert (
        child[4:7] == ["parent", "1:", "handle"]
        and child[child.index("rate") + 1] == "1000000000bit"
    )


def test_bad_layout_is_one_line():
    with pytest.raises(ConfigError, match="nodes=0"):
        EmulatedCluster(0)
    with pytest.raises(ConfigError, match="bad cluster name"):
        EmulatedCluster(2, name="a b")
    c = EmulatedCluster(2, name="x")
    with pytest.raises(ConfigError, match="-np 5 does not fit 2 nodes x 2 slots"):
        c.mpirun_command(5, ["true"], slots=2)
    argv, env = c.mpirun_command(4, ["true"], env={"HVC_X": "1"})
    assert argv[:3] == [shutil.which("ip") or "ip", "netns", "exec"] and argv[3] == "hvc_x_node0"
    assert (
        "node0:2,node1:2" in argv
        and ["-x", "HVC_X"] == argv[argv.index("HVC_X") - 1 : argv.index("HVC_X") + 1]
    )
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1" and argv[-1] == "true"
    # mpirun runs under the local launcher's supervisor (signals once, node0's ranks reaped)
    supervisor = argv.index("hvcodistill.launch")
    assert argv[supervisor + 1] == "--supervise" and argv[supervisor + 2] == shutil.which("mpirun")


# ---------------------------------------------------------------- real namespaces


@needs_cluster
def test_up_hostnames_reachability_and_down(make_cluster):
    c = make_cluster(2)
    assert sorted(our_namespaces(c.name)) == sorted([c.switch, *map(c.namespace, c.hosts)])
    for host in c.hosts:
        out = subprocess.run(
            c.node_command(host, ["hostname"]), capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == host
    # node0 -> node1 and back over the bridge (TCP: this box has no ping)
    assert transfer(c, "node0", "node1", 10_000)[0] == 10_000
    assert transfer(c, "node1", "node0", 10_000)[0] == 10_000
    agent, state = c.agent, c.state_file
    assert agent.exists() and state.exists()
    c.down()
    assert our_namespaces(c.name) == [] and not agent.exists() and not state.exists()
    c.down()  # nothing up: a no-op


@needs_cluster
def test_failure_half_way_through_up_leaves_nothing(tmp_path, monkeypatch):
    add_node = EmulatedCluster._add_node

    def fail_on_node1(self, host):
        if host == "node1":
            raise C.ClusterError("injected failure")
        add_node(self, host)

    monkeypatch.setattr(EmulatedCluster, "_add_node", fail_on_node1)
    c = EmulatedCluster(2, name=unique_name(), state_dir=tmp_path)
    try:
        with pytest.raises(C.ClusterError, match="injected"):
            c.up()
        assert our_namespaces(c.name) == []
        assert list(tmp_path.iterdir()) == []  # no record, no agent
    finally:
        c.down(quiet=True)


@needs_cluster
def test_context_manager_downs_after_an_exception(tmp_path):
    c = EmulatedCluster(2, name=unique_name(), state_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with c:
            assert len(our_namespaces(c.name)) == 3
            raise RuntimeError("boom")
    assert our_namespaces(c.name) == [] and not c.state_file.exists()


@needs_cluster
def test_cli_up_twice_status_down_and_non_root():
    name = unique_name()
    try:
        up = cli("up", "--nodes", "2", "--rate", "1gbit", "--name", name)
        assert up.returncode == 0, up.stderr
        again = cli("up", "--nodes", "2", "--name", name)
        assert (
            again.returncode == 2 and again.stderr.count("\n") == 1 and "already up" in again.stderr
        )
        status = cli("status", "--name", name)
        assert "1gbit" in status.stdout and "198.18.0.2" in status.stdout, status
        shaped = cli("shape", "--rate", "100mbit", "--name", name)
        assert shaped.returncode == 0, shaped.stderr
        qdiscs = subprocess.run(
            ["tc", "-n", f"hvc_{name}_switch", "qdisc", "show"], capture_output=True, text=True
        ).stdout
        assert qdiscs.count("rate 100Mbit") == 2, qdiscs
        run = cli("run", "-np", "4", "--name", name, "--", "sh", "-c", "hostname")
        assert run.returncode == 0 and sorted(run.stdout.split()) == [
            "node0",
            "node0",
            "node1",
            "node1",
        ], run
        bad = cli("shape", "--rate", "fast", "--name", name)
        assert bad.returncode == 2 and bad.stderr.strip() == (
            "hvcodistill.cluster: error: bad rate 'fast': "
            "expected e.g. 100mbit, 1gbit, 10gbit or none"
        )
    finally:
        down = cli("down", "--name", name)
    assert down.returncode == 0 and our_namespaces(name) == []
    again = cli("down", "--name", name)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    if shutil.which("setpriv"):
        user = cli("up", "--name", name, user="65534")
        assert user.returncode == 2 and user.stderr.strip() == (
            "hvcodistill.cluster: error: "
            "the emulated cluster needs root (network namespaces and tc)"
        ), user


@needs_cluster
def test_delay_needs_netem(make_cluster):
    """With netem in the kernel a delay adds latency; without it, up says so and makes nothing."""
    try:
        c = make_cluster(2, rate="1gbit", delay="2ms")
    except ConfigError as e:
        assert "netem" in str(e)
        return
    qdiscs = subprocess.run(
        ["tc", "-n", c.namespace("node0"), "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
    ).stdout
    assert "netem" in qdiscs and "tbf" in qdiscs, qdiscs


# ---------------------------------------------------------------- shaping

RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(20); n, first = 0, None
while chunk := c.recv(1 << 20):
    first = first or time.perf_counter()
    n += len(chunk)
print(n, time.perf_counter() - first, flush=True)
"""
SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], 5001), timeout=20)
s.sendall(bytes(int(sys.argv[2]))); s.close()
"""


def transfer(c: EmulatedCluster, src: str, dst: str, nbytes: int) -> tuple[int, float]:
    """Send `nbytes` over TCP from `src` to `dst`; (bytes received, bits/s seen by the receiver)."""
    recv = subprocess.Popen(
        c.node_command(dst, [sys.executable, "-c", RECEIVER, c.address(dst)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run(
            c.node_command(src, [sys.executable, "-c", SENDER, c.address(dst), str(nbytes)]),
            check=True,
            timeout=30,
        )
        n, seconds = recv.communicate(timeout=30)[0].split()
    finally:
        recv.kill()
        recv.wait()
    return int(n), int(n) * 8 / max(float(seconds), 1e-9)


def held_back(c: EmulatedCluster) -> int:
    """Times the links' tbf shapers held a packet back (tc's overlimits), all links both ways."""
    total = 0
    for host in c.hosts:
        for ns, dev in ((c.namespace(host), "eth0"), (c.switch, c.port(host))):
            out = subprocess.run(
                ["tc", "-s", "-j", "-n", ns, "qdisc", "show", "dev", dev],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            total += sum(q["overlimits"] for q in json.loads(out) if q["kind"] == "tbf")
    return total


def qdiscs(c: EmulatedCluster, host: str) -> list[str]:
    """tc's qdisc lines for both ends of `host`'s link."""
    return [
        subprocess.run(
            ["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True
        ).stdout
        for ns, dev in ((c.namespace(host), "eth0"), (c.switch, c.port(host)))
    ]


@needs_cluster
def test_shaping_both_directions_and_reshape(cluster):
    """A shaped link: tbf at its rate on both ends of every link, and a 5 MB transfer each way
    (40 x the 125 KB the tbf bucket lets through at once) whose packets the shaper held back;
    re-shaped in place to unshaped: no shaper left, and the bytes still arrive. The speeds are
    printed, not bounded."""
    c = cluster
    c.shape("100mbit")
    nbytes = 5_000_000  # 0.4 s at 100 Mbit/s
    for src, dst in (("node0", "node1"), ("node1", "node0")):
        held, t0 = held_back(c), time.perf_counter()
        n, rate = transfer(c, src, dst, nbytes)
        print(
            f"100mbit {src}->{dst}: {n} B at {rate / 1e6:.1f} Mbit/s "
            f"({time.perf_counter() - t0:.2f}s wall), held back {held_back(c) - held} times"
        )
        assert n == nbytes
        assert held_back(c) > held, f"{src}->{dst}: the shaper never held a packet back"
    for host in c.hosts:
        for out in qdiscs(c, host):
            assert "tbf" in out and "rate 100Mbit" in out, (host, out)
    c.shape(None)  # in place, without tearing down
    for host in c.hosts:
        for out in qdiscs(c, host):
            assert "tbf" not in out, (host, out)
    assert transfer(c, "node0", "node1", nbytes)[0] == nbytes


# ---------------------------------------------------------------- MPI across nodes


@needs_cluster
@pytest.mark.mpi
def test_mpi_ranks_see_two_nodes_and_the_ring_crosses_the_links(cluster):
    c = cluster
    c.shape("1gbit")
    cmd, env = c.mpirun_command(4, [sys.executable, str(MPI_DIR / "check_nodes.py")], slots=2)
    before = c.counters()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    after = c.counters()
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    print(proc.stdout)
    assert "nodes ok" in proc.stdout
    # Ring all-reduce of 4 MiB on 4 ranks: each rank sends 2 (W-1)/W = 1.5 x 4 MiB to the next one,
    # and one rank per node (1 -> 2, 3 -> 0) sends it over its node's link.
    need = int(1.5 * 4 * 2**20)
    for host in c.hosts:
        sent = after[host]["tx_bytes"] - before[host]["tx_bytes"]
        received = after[host]["rx_bytes"] - before[host]["rx_bytes"]
        print(
            f"{host}: tx {sent:,} B rx {received:,} B ({sent / need:.3f} x the ring's {need:,} B)"
        )
        assert sent >= need and received >= need
