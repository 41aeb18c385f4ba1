"""A multi-node cluster emulated on one machine: one network namespace per node, shaped links.

    python -m hvcodistill.cluster up --nodes 2 --rate 1gbit    # node0, node1 at 198.18.0.1, .2
    python -m hvcodistill.cluster run -np 4 -- \\
        .venv/bin/python -m hvcodistill.train --config configs/digits_codistill.yaml
    python -m hvcodistill.cluster status                        # rates and per-node byte counters
    python -m hvcodistill.cluster shape --rate 100mbit          # re-shape without tearing down
    python -m hvcodistill.cluster down

Each node is a network namespace `hvc_<name>_<host>` whose processes run in their own UTS namespace
with hostname <host>, so Open MPI sees separate nodes: ranks on one node share memory (vader), ranks
on different nodes talk TCP over that node's `eth0`. The nodes hang off a bridge in a "switch"
namespace; nothing is added to the root namespace. Every node's link is shaped with tc in both
directions (node eth0 egress, and the switch-side veth egress toward the node), so a rate is the
link's capacity each way, like a NIC on a cluster fabric. Addresses come from the benchmarking range
198.18.0.0/15 and exist only inside these namespaces. A delay (netem, when the kernel has it) is
added on each of those two hops, so it adds 2 x delay to the one-way latency between two nodes.

mpirun runs inside node0 (like a batch script on the first node of an allocation) and reaches the
other nodes through a generated launch agent (`--mca plm_rsh_agent`), Open MPI's ssh stand-in.
`up` records what it creates in /run/hvcodistill-cluster/<name>.json as it goes; `down` removes
exactly that. Root only (namespaces and tc need CAP_NET_ADMIN/CAP_SYS_ADMIN).

Modules: shaping.py (rates, delays, tc qdiscs; pure), system.py (what the machine must offer, and
the commands that build the cluster), emulated.py (the cluster and its mpirun command line).
"""

from hvcodistill.cluster.emulated import STATE_DIR, EmulatedCluster, clusters_up
from hvcodistill.cluster.shaping import (
    format_rate,
    parse_delay,
    parse_rate,
    qdisc_commands,
    tbf_burst,
)
from hvcodistill.cluster.system import ClusterError, cluster_unavailable

__all__ = [
    "STATE_DIR",
    "ClusterError",
    "EmulatedCluster",
    "cluster_unavailable",
    "clusters_up",
    "format_rate",
    "parse_delay",
    "parse_rate",
    "qdisc_commands",
    "tbf_burst",
]
