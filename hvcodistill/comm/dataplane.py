"""The data plane: what the training loop asks of the library that averages a model's gradients
over its group (group_comm), behind one small interface, chosen by name.

The MPI control plane (the split, the agreements, the preemption checks, the watchdog) stays
in mpi4py; a data plane carries the group's gradients, its initial broadcast and the averaging
of buffers for evaluation. Two, by train.backend:

- `horovod`: Horovod on group_comm (DistributedOptimizer's hooks, `synchronize()`).
- `torch`: torch.distributed from the same MPI ranks: one world whose rendezvous address world
  rank 0 broadcasts over COMM_WORLD (no launcher, no environment to set), one process group per
  model's group; each gradient's all-reduce starts as soon as backward has accumulated it (gloo on
  CPU, NCCL on GPU, which ships inside the torch wheel) and `wait_gradients` waits for them.

Each data plane also hands the exchanges their wire (`wire()`): the all-gathers of raw bytes among
a rank's peers (peer_comm: one rank per model) and its group. Horovod's is mpi4py on the host, so a
GPU's payload is staged through host memory; torch's runs on process groups of the same ranks,
gloo on CPU and NCCL on the GPU's own memory (no host staging).

Nothing outside this module imports Horovod or torch.distributed.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

import torch

from hvcodistill.comm.traffic import horovod_algorithm
from hvcodistill.errors import ConfigError


class DataPlane(Protocol):
    """One model's group: averages its ranks' gradients and buffers."""

    name: str
    algorithm: str  # the all-reduce's byte model (comm/traffic.py): ring | hierarchical

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        """The optimizer whose backward pass starts the gradient all-reduce."""

    def broadcast_initial(self, model: torch.nn.Module) -> None:
        """Every rank of the group starts from group rank 0's parameters and buffers."""

    def wait_gradients(self, optimizer) -> None:
        """Block until the group's averaged gradients are in every parameter's .grad."""

    def step(self, optimizer, scaler) -> None:
        """The optimizer step on the gradients wait_gradients delivered (no second all-reduce)."""

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Average `tensors` over the group in place, in one grouped call."""

    def wire(self) -> Wire:
        """The exchanges' wire among this rank's peers and group (built once, on first use)."""

    def shutdown(self) -> None:
        """Every rank of the world, at the same point: the data plane's threads stop."""


class Request(Protocol):
    """A non-blocking collective in flight."""

    def test(self) -> bool:
        """Whether it has completed (and moves it on); never blocks."""

    def wait(self) -> None:
        """Block until it has completed."""


class Wire(Protocol):
    """All-gathers of uint8 tensors over `which` = "peer" (one rank per model, row m from model
    m) or "group" (this model's ranks, row r from group rank r). `send` is 1-D; `recv` holds
    size(which) rows of send's length, contiguous; both on `device`, where the caller builds its
    buffers."""

    name: str
    device: torch.device

    def size(self, which: str) -> int: ...

    def rank(self, which: str) -> int: ...

    def allgather(self, which: str, send: torch.Tensor, recv: torch.Tensor) -> None: ...

    def iallgather(self, which: str, send: torch.Tensor, recv: torch.Tensor) -> Request: ...

    def private(self) -> Wire:
        """A wire of its own on the same ranks (every rank of the world calls it at the same
        point): its non-blocking collectives, posted at steps that differ between ranks, can
        never interleave with anyone else's."""


class MpiWire:
    """peer_comm and group_comm (mpi4py), buffers in host memory: any MPI works, CUDA-aware or
    not, and a GPU's payload is staged through the host."""

    name = "mpi"
    device = torch.device("cpu")

    def __init__(self, peer, group):
        self.comms = {"peer": peer, "group": group}

    def size(self, which):
        return self.comms[which].Get_size()

    def rank(self, which):
        return self.comms[which].Get_rank()

    def allgather(self, which, send, recv):
        self.comms[which].Allgather(send.numpy(), recv.numpy())

    def iallgather(self, which, send, recv):
        return _MpiRequest(self.comms[which].Iallgather(send.numpy(), recv.numpy()))

    def private(self):
        return MpiWire(self.comms["peer"].Dup(), self.comms["group"].Dup())


class _MpiRequest:
    def __init__(self, request):
        self.request = request

    def test(self):
        return self.request.Test()

    def wait(self):
        self.request.Wait()


class TorchWire:
    """Process groups of the same ranks: every peer set's and every model group's, created by
    every rank in one order (torch.distributed's rule). Buffers live on `device`: the GPU with
    NCCL, so a payload never leaves it; the host with gloo."""

    name = "torch"

    def __init__(self, dist, comms, device: torch.device):
        topology = comms.topology
        peers = [dist.new_group(topology.peers(r)) for r in range(topology.group_size)]
        self.dist, self.comms, self.device = dist, comms, device
        self.groups = {"group": model_group(dist, comms), "peer": peers[comms.group_rank]}
        self.sizes = {"group": topology.group_size, "peer": topology.n_models}
        self.ranks = {"group": comms.group_rank, "peer": comms.model_id}
        # torch >= 2.14 names it all_gather_single; all_gather_into_tensor before (deprecated)
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def size(self, which):
        return self.sizes[which]

    def rank(self, which):
        return self.ranks[which]

    def allgather(self, which, send, recv):
        self._gather(recv.view(-1), send, group=self.groups[which])

    def iallgather(self, which, send, recv):
        work = self._gather(recv.view(-1), send, group=self.groups[which], async_op=True)
        return _TorchRequest(work)

    def private(self):
        return TorchWire(self.dist, self.comms, self.device)


class _TorchRequest:
    def __init__(self, work):
        self.work = work

    def test(self):
        return self.work.is_completed()

    def wait(self):
        self.work.wait()


def model_group(dist, comms):
    """A new process group of this rank's model group. Every rank creates every model's, in the
    same order (torch.distributed's rule), and keeps its own."""
    topology = comms.topology
    groups = [dist.new_group(topology.group_members(m)) for m in range(topology.n_models)]
    return groups[comms.model_id]


def optimizer_step(optimizer, scaler) -> None:
    """The update on gradients already averaged; with fp16 loss scaling, unscaled first."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class HorovodDataPlane:
    """Horovod on group_comm: DistributedOptimizer's hooks all-reduce gradients during the
    backward pass, and `synchronize()` waits for them."""

    name = "horovod"

    def __init__(self, comms, device_type: str):
        try:
            import horovod.torch as hvd  # optional: only a run on this backend needs it
        except ImportError as e:
            raise ConfigError(
                f"train.backend=horovod: Horovod cannot be imported ({e}); build it with "
                "`make setup`, or run with train.backend=torch"
            ) from None
        self.hvd = hvd
        hvd.init(comm=comms.group)  # Horovod's all-reduce runs on group_comm only
        self.algorithm = horovod_algorithm(device_type, os.environ)
        self._wire = MpiWire(comms.peer, comms.group)

    def wire(self):
        return self._wire

    def wrap_optimizer(self, optimizer, model):
        # group_comm: gradients are averaged over the group during backward
        return self.hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), op=self.hvd.Average
        )

    def broadcast_initial(self, model):
        # group_comm: group rank 0's weights. Not broadcast_optimizer_state: on a fresh optimizer
        # it takes a step on zero gradients, which applies weight decay once before training.
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def wait_gradients(self, optimizer):
        optimizer.synchronize()  # group_comm: the averaged gradients

    def step(self, optimizer, scaler):
        with optimizer.skip_synchronize():  # wait_gradients already synchronised
            optimizer_step(optimizer, scaler)

    def average_(self, tensors):
        if tensors:
            # group_comm: one fused all-reduce for every tensor
            self.hvd.grouped_allreduce_(tensors, op=self.hvd.Average, name="buffers")

    def shutdown(self):
        self.hvd.shutdown()


class TorchDataPlane:
    """torch.distributed on the MPI ranks: a world of every rank, a process group per model's
    group. The gradients are all-reduced in buckets of about BUCKET_BYTES, as DDP does: the
    parameters in reverse order (the order backward reaches them), a bucket's sum starting,
    asynchronous, the moment backward has accumulated its last gradient, so communication
    overlaps the rest of backward; `wait_gradients` waits for them (starting any bucket whose
    gradients never came, in bucket order) and hands each parameter its mean. Every rank of a
    group runs the same model, so the buckets start in the same order on every rank."""

    name = "torch"
    algorithm = "ring"  # the byte model's all-reduce (gloo's and NCCL's large-message ring)
    BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb

    def __init__(self, comms, device_type: str):
        self.dist = dist = torch_world(comms.world, device_type)
        self.comms, self.device_type, self._wire = comms, device_type, None
        self.group = model_group(dist, comms)
        self.group_size = comms.topology.group_size
        self.root = comms.group_ranks[0]  # group rank 0, as a world rank
        self._buckets: list[list[torch.nn.Parameter]] = []
        self._flats: list[torch.Tensor] = []  # per bucket: its gradients laid end to end
        self._ready: list[int] = []  # per bucket: gradients accumulated this step
        self._pending: dict[int, tuple] = {}  # bucket -> (flat sum, work) started this step
        self._hooks: list = []

    def wrap_optimizer(self, optimizer, model):
        if self.group_size == 1:
            return optimizer
        bucket, size = [], 0
        for p in reversed([p for p in model.parameters() if p.requires_grad]):
            nbytes = p.numel() * p.element_size()
            if bucket and (size + nbytes > self.BUCKET_BYTES or p.dtype != bucket[0].dtype):
                self._buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
            index = len(self._buckets)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(index)))
        if bucket:
            self._buckets.append(bucket)
        self._ready = [0] * len(self._buckets)
        # one buffer per bucket for the whole run: a fresh one each step costs its page faults
        self._flats = [
            torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
            for b in self._buckets
        ]
        return optimizer

    def _hook(self, index: int):
        def ready(p) -> None:
            self._ready[index] += 1
            if self._ready[index] == len(self._buckets[index]):
                self._start(index)

        return ready

    def _start(self, index: int) -> None:
        bucket, flat = self._buckets[index], self._flats[index]
        torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket],
            out=flat,
        )
        # group_comm: this bucket's sum over the group, while backward goes on
        self._pending[index] = (flat, self.dist.all_reduce(flat, group=self.group, async_op=True))

    def wait_gradients(self, optimizer):
        for index in range(len(self._buckets)):
            if index not in self._pending:  # a gradient never came (an unused parameter)
                self._start(index)
        for index, bucket in enumerate(self._buckets):
            flat, work = self._pending.pop(index)
            work.wait()
            flat.div_(self.group_size)
            for p, part in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                if p.grad is None:
                    p.grad = part.view_as(p).clone()
                else:
                    p.grad.copy_(part.view_as(p))
        self._ready = [0] * len(self._buckets)

    def wire(self):
        if self._wire is None:  # built on first use: a run without exchanges needs none
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if self.device_type == "cuda"
                else torch.device("cpu")
            )
            self._wire = TorchWire(self.dist, self.comms, device)
        return self._wire

    def broadcast_initial(self, model):
        # group_comm: group rank 0's parameters and buffers
        if self.group_size > 1:
            for t in model.state_dict().values():
                self.dist.broadcast(t, src=self.root, group=self.group)

    def step(self, optimizer, scaler):
        optimizer_step(optimizer, scaler)

    def average_(self, tensors):
        if not tensors or self.group_size == 1:
            return
        # group_comm: one all-reduce per dtype, of the tensors laid end to end
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for same in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            self.dist.all_reduce(flat, group=self.group)
            flat = flat / self.group_size if flat.is_floating_point() else flat // self.group_size
            for t, part in zip(same, flat.split([t.numel() for t in same]), strict=True):
                t.copy_(part.view_as(t))

    def shutdown(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.dist.destroy_process_group()


def torch_world(world, device_type: str):
    """torch.distributed's default group over every rank of `world` (COMM_WORLD), gloo on CPU
    and NCCL on GPU; returns torch.distributed. World rank 0 serves the rendezvous store on a
    free port of its address (MASTER_ADDR if set, else its hostname's) and tells everyone."""
    import torch.distributed as dist

    rank, size = world.Get_rank(), world.Get_size()
    store = address = None
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        store = dist.TCPStore(host, 0, size, is_master=True, wait_for_workers=False)
        address = (host, store.port)
    host, port = world.bcast(address, root=0)  # COMM_WORLD
    if store is None:
        store = dist.TCPStore(host, port, size, is_master=False)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", store=store, rank=rank, world_size=size
    )
    return dist


def plain_ddp(model: torch.nn.Module, world, device: torch.device) -> torch.nn.Module:
    """The plain loop's model (hvcodistill.reference with train.backend=torch): torch's own
    DistributedDataParallel over every rank of `world`, as a user would write it; it broadcasts
    rank 0's parameters and buckets the gradients' all-reduce itself. plain_ddp_close() ends it."""
    from torch.nn.parallel import DistributedDataParallel

    torch_world(world, device.type)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def plain_ddp_close() -> None:
    import torch.distributed as dist

    dist.destroy_process_group()


BACKENDS = {"horovod": HorovodDataPlane, "torch": TorchDataPlane}


def make_data_plane(name: str, comms, device_type: str) -> DataPlane:
    """The data plane called `name` (train.backend), started on this rank's communicators."""
    if name not in BACKENDS:
        raise ConfigError(f"config key train.backend: {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name](comms, device_type)
