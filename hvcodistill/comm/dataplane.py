"""The data plane: what the training loop asks of the library that averages a model's gradients
over its group (group_comm), behind one small interface, chosen by name.

The MPI control plane (the split, the agreements, the preemption checks, the watchdog) stays
in mpi4py; a data plane carries the group's gradients, its initial broadcast and the averaging
of buffers for evaluation. Nothing outside this module imports Horovod.
"""

from __future__ import annotations

import os
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

    def shutdown(self) -> None:
        """Every rank of the world, at the same point: the data plane's threads stop."""


class HorovodDataPlane:
    """Horovod on group_comm: DistributedOptimizer's hooks all-reduce gradients during the
    backward pass, and `synchronize()` waits for them."""

    name = "horovod"

    def __init__(self, group_comm, device_type: str):
        import horovod.torch as hvd  # the build is optional: only a run on this backend needs it

        self.hvd = hvd
        hvd.init(comm=group_comm)  # Horovod's all-reduce runs on group_comm only
        self.algorithm = horovod_algorithm(device_type, os.environ)

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
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    def average_(self, tensors):
        if tensors:
            # group_comm: one fused all-reduce for every tensor
            self.hvd.grouped_allreduce_(tensors, op=self.hvd.Average, name="buffers")

    def shutdown(self):
        self.hvd.shutdown()


BACKENDS = {"horovod": HorovodDataPlane}


def make_data_plane(name: str, group_comm, device_type: str) -> DataPlane:
    """The data plane called `name`, started on group_comm."""
    if name not in BACKENDS:
        raise ConfigError(f"config key train.backend: {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name](group_comm, device_type)
