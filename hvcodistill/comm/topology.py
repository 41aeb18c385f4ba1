"""World -> models -> groups and peers: the arithmetic, validated in one place, and the one split.

W ranks train M models; each model is trained data-parallel by a group of G = W / M ranks.
Placement is contiguous (model_id = world_rank // G), so a model's all-reduce stays inside a node
whenever G ranks fit on one, and only the small peer traffic crosses the network. Which node each
rank runs on (`NodeLayout`) is found from MPI: the ranks that share memory are one node.

mpi4py is imported inside the two functions that call MPI: importing mpi4py.MPI initialises MPI,
and the planner and the tests use this module without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvcodistill.errors import ConfigError


@dataclass(frozen=True)
class NodeLayout:
    """Which node each world rank runs on. Nodes are numbered in order of their lowest rank."""

    node_of: tuple[int, ...]  # world rank -> node index
    hosts: tuple[str, ...] = ()  # node index -> host name (for the record)

    @classmethod
    def from_mpi(cls, world, local) -> "NodeLayout":
        """COMM_WORLD allgather of (lowest world rank of my shared-memory communicator, host):
        ranks that share memory are one node, as MPI itself decides."""
        from mpi4py import MPI

        leader = local.allreduce(world.Get_rank(), op=MPI.MIN)
        pairs = world.allgather((leader, MPI.Get_processor_name()))
        leaders = sorted({lead for lead, _ in pairs})
        index = {lead: i for i, lead in enumerate(leaders)}
        hosts = tuple(
            dict((index[lead], host) for lead, host in pairs)[i] for i in range(len(leaders))
        )
        return cls(node_of=tuple(index[lead] for lead, _ in pairs), hosts=hosts)

    @classmethod
    def contiguous(cls, world_size: int, ranks_per_node: int) -> "NodeLayout":
        """The layout of a cluster of equal nodes with ranks placed in blocks (the planner's)."""
        return cls(node_of=tuple(r // ranks_per_node for r in range(world_size)))

    @property
    def n_nodes(self) -> int:
        return max(self.node_of) + 1 if self.node_of else 0

    def ranks_per_node(self) -> list[int]:
        counts = [0] * self.n_nodes
        for node in self.node_of:
            counts[node] += 1
        return counts

    def link(self, a: int, b: int) -> str:
        return "intra_node" if self.node_of[a] == self.node_of[b] else "inter_node"

    def as_dict(self) -> dict:
        return {
            "count": self.n_nodes,
            "ranks_per_node": self.ranks_per_node(),
            "hosts": list(self.hosts),
            "node_of_rank": list(self.node_of),
        }


@dataclass(frozen=True)
class Topology:
    world_size: int
    n_models: int

    def __post_init__(self) -> None:
        w, m = self.world_size, self.n_models
        g = w // m if m >= 1 else 0
        if w < 1 or m < 1 or w % m != 0 or g < 1:
            raise ConfigError(
                f"impossible topology: world size W={w}, codistill.n_models M={m}, group size "
                f"G=W/M={f'{w}/{m}' if m else 'undefined'}; W must be a positive multiple of M >= 1"
            )

    @property
    def group_size(self) -> int:
        return self.world_size // self.n_models

    def model_id(self, world_rank: int) -> int:
        return world_rank // self.group_size

    def group_rank(self, world_rank: int) -> int:
        return world_rank % self.group_size

    def group_members(self, model_id: int) -> list[int]:
        """World ranks that train `model_id`."""
        g = self.group_size
        return list(range(model_id * g, (model_id + 1) * g))

    def peers(self, group_rank: int) -> list[int]:
        """World ranks that share `group_rank`, one per model, in model order."""
        return [m * self.group_size + group_rank for m in range(self.n_models)]

    def as_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "n_models": self.n_models,
            "group_size": self.group_size,
        }


@dataclass
class Comms:
    """The communicators of one rank. `group` carries Horovod's all-reduce, `peer` the exchange."""

    world: object
    group: object
    peer: object
    local: object  # ranks on this node (shared memory), for picking the GPU
    topology: Topology
    model_id: int
    group_rank: int
    nodes: NodeLayout  # which node each world rank runs on, as MPI sees it

    @property
    def world_rank(self) -> int:
        return self.world.Get_rank()

    @property
    def group_ranks(self) -> list[int]:
        """World ranks of this model's group, in group-rank order (Horovod's ring order)."""
        return self.topology.group_members(self.model_id)

    @property
    def peer_ranks(self) -> list[int]:
        """World ranks of this rank's peers, in model order (this rank included)."""
        return self.topology.peers(self.group_rank)


def split_communicators(world, n_models: int) -> Comms:
    """Split COMM_WORLD once into group_comm (same model) and peer_comm (same group rank)."""
    from mpi4py import MPI

    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        # Horovod's background thread and our mpi4py calls share MPI: anything less is unsafe.
        raise ConfigError(
            "MPI does not provide MPI_THREAD_MULTIPLE; use an MPI built with thread support"
        )
    topo = Topology(world.Get_size(), n_models)
    rank = world.Get_rank()
    model_id, group_rank = topo.model_id(rank), topo.group_rank(rank)
    # Same color = same model: Horovod averages gradients only among these ranks.
    group = world.Split(color=model_id, key=group_rank)
    # Same color = same group rank: the M peers that exchange predictions or weights.
    peer = world.Split(color=group_rank, key=model_id)
    # Ranks sharing memory = one node: the node-local rank picks the GPU, found by MPI, not guessed.
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    return Comms(
        world=world,
        group=group,
        peer=peer,
        local=local,
        topology=topo,
        model_id=model_id,
        group_rank=group_rank,
        nodes=NodeLayout.from_mpi(world, local),
    )
