"""What peers send each other over peer_comm, and the teachers a student distils from.

Every exchange is one MPI Allgather on peer_comm (the M ranks with the same group rank), of raw
bytes staged on the host, so any dtype travels exactly and any MPI (CUDA-aware or not) works.
All peers call the same collectives in the same order: the cadence is a pure function of the step.
"""
from __future__ import annotations

import copy
import time

from typing import Callable

import numpy as np
import torch

from hvcodistill.comm.traffic import Traffic
from hvcodistill.data.sharding import batch_checksum
from hvcodistill.training.schedules import itstime


class BatchMismatchError(RuntimeError):
    """Peers in `predictions` mode did not hold the same batch; `report`: this rank says so."""

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report


class Exchange:
    """No coupling (M = 1 or alpha = 0): the plain all-reduce baseline.

    `traffic` (shared with the trainer) counts what each exchange sends by link; `peers_by_link`
    says how many of this rank's peers sit on its node and on other nodes."""

    def __init__(self, traffic: Traffic | None = None, peers_by_link: dict | None = None) -> None:
        self.seconds = 0.0          # wall time inside exchanges
        self.bytes_received = 0     # bytes this rank received from its peers
        self.count = 0
        self.traffic = traffic if traffic is not None else Traffic()
        self.peers_by_link = peers_by_link or {}

    def state_dict(self) -> dict:
        """The counters a checkpoint keeps (teachers are saved by the checkpoint itself)."""
        return {"seconds": self.seconds, "bytes_received": self.bytes_received, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.bytes_received, self.count = state["seconds"], state["bytes_received"], state["count"]

    def teacher_logits(self, *, step: int, x: torch.Tensor, logits: torch.Tensor,
                       alpha: float) -> list[torch.Tensor]:
        return []

    def _allgather_bytes(self, peer, payload: np.ndarray) -> np.ndarray:
        """peer_comm Allgather of one uint8 buffer; returns (M, nbytes), row m from model m."""
        start = time.perf_counter()
        out = np.empty((peer.Get_size(), payload.size), dtype=np.uint8)
        peer.Allgather(payload, out)
        self.seconds += time.perf_counter() - start
        self.bytes_received += out.nbytes - payload.nbytes
        self.count += 1
        # each of the M-1 peers receives this rank's payload: on this node or across the network
        self.traffic.add("exchange", {link: n * payload.nbytes for link, n in self.peers_by_link.items()})
        return out


class PredictionExchange(Exchange):
    """Every k steps peers allgather the logits of the batch they all hold (data.order=shared).

    A batch checksum (epoch and sample indices, from `batch_key(step)`) rides in the same buffer,
    so a peer holding a different batch is caught on every exchange at the cost of 8 bytes; it is
    computed on exchange steps only.
    """

    def __init__(self, peer, model_id: int, every: int, batch_key: Callable[[int], tuple], **counting):
        super().__init__(**counting)
        self.peer, self.model_id, self.every, self.batch_key = peer, model_id, every, batch_key

    def teacher_logits(self, *, step, x, logits, alpha):
        if alpha == 0 or not itstime(step, self.every):
            return []
        checksum = batch_checksum(*self.batch_key(step))
        local = logits.detach().float().cpu().contiguous().numpy()
        payload = np.concatenate([local.reshape(-1).view(np.uint8),
                                  np.array([checksum], dtype=np.uint64).view(np.uint8)])
        rows = self._allgather_bytes(self.peer, payload)
        sums = rows[:, -8:].copy().view(np.uint64).reshape(-1)
        if len(set(sums.tolist())) != 1:
            raise BatchMismatchError(
                f"step {step}: peers hold different batches (checksums {[hex(s) for s in sums]}); "
                "predictions mode needs data.order=shared and identical data on every peer",
                report=self.model_id == 0)
        return [torch.from_numpy(rows[m, :-8].copy().view(np.float32).reshape(local.shape)).to(logits.device)
                for m in range(len(rows)) if m != self.model_id]


class WeightExchange(Exchange):
    """Every k steps peers allgather parameters and buffers into M-1 local teacher copies.

    The teachers are stale copies of the peer models (Anil et al. 2018): eval mode, no gradients,
    one extra forward per step, distilled from on every step.
    """

    def __init__(self, peer, model_id: int, every: int, model: torch.nn.Module, **counting):
        super().__init__(**counting)
        self.peer, self.model_id, self.every, self.model = peer, model_id, every, model
        self.teachers = []
        for _ in range(peer.Get_size() - 1):
            t = copy.deepcopy(model).eval()
            t.requires_grad_(False)
            self.teachers.append(t)

    @staticmethod
    def _state(module: torch.nn.Module) -> list[torch.Tensor]:
        return list(module.state_dict(keep_vars=True).values())

    def exchange(self) -> None:
        """Allgather this model's parameters and buffers; load each peer's into its teacher."""
        mine = self._state(self.model)
        payload = torch.cat([t.detach().reshape(-1).view(torch.uint8).cpu() for t in mine]).numpy()
        rows = self._allgather_bytes(self.peer, payload)
        others = [m for m in range(len(rows)) if m != self.model_id]
        with torch.no_grad():
            for teacher, m in zip(self.teachers, others):
                offset = 0
                for src, dst in zip(mine, self._state(teacher)):
                    n = src.numel() * src.element_size()
                    raw = torch.from_numpy(rows[m, offset:offset + n].copy())
                    dst.copy_(raw.view(src.dtype).view(src.shape))
                    offset += n

    def teacher_logits(self, *, step, x, logits, alpha):
        if itstime(step, self.every):
            self.exchange()
        if alpha == 0:
            return []
        with torch.no_grad():
            return [t(x) for t in self.teachers]


def make_exchange(*, mode: str, n_models: int, alpha: float, every: int, peer, model_id: int,
                  model: torch.nn.Module, batch_key: Callable[[int], tuple], traffic: Traffic | None = None,
                  peers_by_link: dict | None = None) -> Exchange:
    counting = {"traffic": traffic, "peers_by_link": peers_by_link}
    if n_models == 1 or alpha == 0:
        return Exchange(**counting)
    if mode == "predictions":
        return PredictionExchange(peer, model_id, every, batch_key, **counting)
    return WeightExchange(peer, model_id, every, model, **counting)
