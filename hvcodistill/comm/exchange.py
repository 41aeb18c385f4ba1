"""What peers send each other over peer_comm, and the teachers a student distils from.

Every exchange is one all-gather among the peers (the M ranks with the same group rank) of raw
bytes, so any dtype travels exactly, on the data plane's wire (comm/dataplane.py): mpi4py on the
host with Horovod (a GPU's payload is staged, and any MPI works, CUDA-aware or not), the peers'
process group with train.backend=torch (gloo on CPU; NCCL on the GPU's memory, no staging).
All peers call the same collectives in the same order: the cadence is a pure function of the step.
(A weights-mode refresh is sharded and non-blocking: see WeightExchange.)
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import math
import time
import weakref
from typing import Callable

import torch

from hvcodistill.comm.modes import CHECKSUM_BYTES, Mode, Predictions, Weights
from hvcodistill.comm.topk import INDEX_DTYPE, topk_payload, topk_teacher_logits
from hvcodistill.comm.traffic import Traffic
from hvcodistill.data.sharding import batch_checksum
from hvcodistill.errors import DataMismatchError


class BatchMismatchError(DataMismatchError):
    """Peers in `predictions` mode did not hold the same batch. Only the peers see it, the
    other ranks wait in collectives: the job is aborted, `says` on model 0's rank."""

    def __init__(self, message: str, report: bool):
        super().__init__(message, says=report)


class Exchange:
    """What every exchange shares: its counters and timing. Subclasses say what travels, and
    which mode's rules (comm/modes.py) they implement.

    `traffic` (shared with the trainer) counts what each exchange sends by link; `peers_by_link`
    says how many of this rank's peers sit on its node and on other nodes."""

    mode: type[Mode] | None = None

    def __init__(self, traffic: Traffic | None = None, peers_by_link: dict | None = None) -> None:
        self.seconds = 0.0  # wall time inside exchanges (see _timed), staging included
        self.bytes_received = 0  # bytes this rank received from its peers
        self.count = 0
        self.traffic = traffic if traffic is not None else Traffic()
        self.peers_by_link = peers_by_link or {}
        self._timing = False  # inside a _timed() block: nested blocks count once

    @contextlib.contextmanager
    def _timed(self, device: torch.device | None = None):
        """Add the block's wall time to `seconds` (the summary's exchange_s): use it around the
        whole exchange as the training thread sees it, copies to and from the host included.
        On a GPU (`device`), the device is synchronised when the block starts, so compute still
        queued is not counted as exchange, and when it ends, so the copy back to it is. A block
        inside another counts once (the outer one)."""
        if self._timing:
            yield
            return
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        self._timing = True
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - start
            self._timing = False

    def state_dict(self) -> dict:
        """The counters a checkpoint keeps (teachers are saved by the checkpoint itself)."""
        return {"seconds": self.seconds, "bytes_received": self.bytes_received, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.bytes_received, self.count = (
            state["seconds"],
            state["bytes_received"],
            state["count"],
        )

    def group_state_dict(self) -> dict:
        """What every rank of the group holds alike (a checkpoint saves it once); call it after
        state_dict(), which every rank calls at the same step."""
        return {}

    def load_group_state_dict(self, state: dict) -> None:
        pass

    def teacher_logits(
        self,
        *,
        step: int,
        x: torch.Tensor,
        logits: torch.Tensor,
        alpha: float,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The teachers' logits for this batch (x, labels y): constants, possibly none."""
        return []

    def _allgather_bytes(self, wire, payload: torch.Tensor) -> torch.Tensor:
        """The peers' all-gather of one uint8 payload on `wire`; returns (M, nbytes) on the wire's
        device, row m from model m."""
        payload = payload.to(wire.device)  # the MPI wire: staged on the host
        out = torch.empty(
            (wire.size("peer"), payload.numel()), dtype=torch.uint8, device=wire.device
        )
        with self._timed():
            wire.allgather("peer", payload, out)
        nbytes = payload.numel()
        self.bytes_received += out.numel() - nbytes
        self.count += 1
        # each of the M-1 peers receives this rank's payload: on this node or across the network
        self.traffic.add("exchange", {link: n * nbytes for link, n in self.peers_by_link.items()})
        return out


class NoExchange(Exchange):
    """No coupling (M = 1 or alpha = 0): nothing travels between peers, no teachers; the plain
    all-reduce baseline, each group exactly an independent Horovod run."""


# What logits travel as in predictions mode (codistill.payload_dtype). fp32 is exact; fp16 and bf16
# halve the bytes: fp16 keeps 11 significant bits and saturates at +-65504, bf16 keeps 8 bits and
# fp32's range. Every payload travels as raw bytes (MPI and numpy have no bfloat16).
PAYLOAD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FP16_MAX = float(torch.finfo(torch.float16).max)
_CHECKSUM_BYTES = CHECKSUM_BYTES


def pack_logits(logits: torch.Tensor, payload_dtype: str, checksum: int) -> torch.Tensor:
    """The bytes one rank sends, a uint8 tensor on the logits' device: its logits in
    `payload_dtype` (cast there, so a copy to the host moves the smaller payload), then the batch
    checksum as 8 little-endian bytes."""
    wire = logits.detach()
    if payload_dtype == "fp16":
        wire = wire.float().clamp(-_FP16_MAX, _FP16_MAX)  # saturate rather than become inf
    return _payload([wire.to(PAYLOAD_DTYPES[payload_dtype])], checksum)


def _payload(parts: list[torch.Tensor], checksum: int) -> torch.Tensor:
    """The send buffer, on the parts' device: each tensor's bytes in turn, then the batch checksum
    as 8 little-endian bytes."""
    raw = [t.contiguous().view(-1).view(torch.uint8) for t in parts]
    n = sum(r.numel() for r in raw)
    payload = torch.empty(n + _CHECKSUM_BYTES, dtype=torch.uint8, device=raw[0].device)
    at = 0
    for r in raw:
        payload[at : at + r.numel()].copy_(r)
        at += r.numel()
    payload[at:].copy_(torch.tensor(list(checksum.to_bytes(_CHECKSUM_BYTES, "little"))))
    return payload


def pack_topk(logits: torch.Tensor, k: int, payload_dtype: str, checksum: int) -> torch.Tensor:
    """A top-k payload (comm/topk.py): per row of the logits (..., C), its k largest
    log-probabilities in `payload_dtype`, then their int32 indices, then the batch checksum."""
    return _payload(list(topk_payload(logits, k, PAYLOAD_DTYPES[payload_dtype])), checksum)


def unpack_topk(
    row: torch.Tensor, k: int, payload_dtype: str, shape, device: torch.device
) -> torch.Tensor:
    """A peer's teacher logits (float32 log-probabilities, the rest of the mass spread evenly)
    from its top-k payload row."""
    rows = math.prod(shape[:-1])
    dtype = PAYLOAD_DTYPES[payload_dtype]
    n_values = rows * k * torch.finfo(dtype).bits // 8
    raw = row[:-_CHECKSUM_BYTES].clone()
    values = raw[:n_values].view(dtype).view(*shape[:-1], k).to(device)
    indices = raw[n_values:].view(INDEX_DTYPE).view(*shape[:-1], k).to(device)
    return topk_teacher_logits(values, indices, shape[-1])


def unpack_logits(
    row: torch.Tensor, payload_dtype: str, shape, device: torch.device
) -> torch.Tensor:
    """A peer's logits from its payload row: float32 on `device`, for the loss (moved there, if
    the row is elsewhere, in the payload dtype, and widened there)."""
    raw = row[:-_CHECKSUM_BYTES].clone()
    return raw.view(PAYLOAD_DTYPES[payload_dtype]).view(shape).to(device).float()


def payload_checksum(row: torch.Tensor) -> int:
    return int.from_bytes(bytes(row[-_CHECKSUM_BYTES:].tolist()), "little")


class PredictionExchange(Exchange):
    """Every k steps peers allgather the logits of the batch they all hold (data.order=shared).

    A batch checksum rides in the same buffer: the plan (epoch and sample indices, from
    `batch_key(step)`) and the content actually delivered (the labels y and an exact digest of
    every input value of x: data.sharding.content_digest), so a peer holding a different batch,
    or the same samples read from different data, is caught on every exchange at the cost of
    8 bytes; it is computed on exchange steps only (given no x and y, the plan only). Logits
    travel as `payload_dtype` (fp32: exact, the default;
    fp16/bf16: half the bytes) and come back as float32. `seconds` covers the whole exchange:
    checksum, cast and copy to the host, allgather, unpacking and the copy back to the device.
    """

    mode = Predictions

    def __init__(
        self,
        wire,
        model_id: int,
        every: int,
        batch_key: Callable[[int], tuple],
        payload_dtype: str = "fp32",
        topk: int = 0,
        **counting,
    ):
        """`wire`: the data plane's (comm/dataplane.py Wire), whose "peer" all-gather carries
        the logits."""
        super().__init__(**counting)
        if payload_dtype not in PAYLOAD_DTYPES:
            raise ValueError(
                f"payload_dtype must be one of {', '.join(PAYLOAD_DTYPES)}, got {payload_dtype!r}"
            )
        self.wire, self.model_id, self.every, self.batch_key = wire, model_id, every, batch_key
        self.payload_dtype, self.topk = payload_dtype, topk  # topk 0: every logit

    @classmethod
    def from_config(cls, c, *, comms, wire, model, batch_key, group_by_link=None, **counting):
        return cls(
            wire,
            comms.model_id,
            c.every,
            batch_key,
            payload_dtype=c.payload_dtype,
            topk=c.topk,
            **counting,
        )

    def teacher_logits(self, *, step, x, logits, alpha, y=None):
        if alpha == 0 or not self.mode.exchanges_at(step, every=self.every, burn_in=0):
            return []
        with self._timed(logits.device):
            checksum = batch_checksum(*self.batch_key(step), x=x, y=y)
            k = min(self.topk, logits.shape[-1])
            payload = (
                pack_topk(logits, k, self.payload_dtype, checksum)
                if k
                else pack_logits(logits, self.payload_dtype, checksum)
            )
            rows = self._allgather_bytes(self.wire, payload)
            sums = [payload_checksum(row) for row in rows]
            if len(set(sums)) != 1:
                raise BatchMismatchError(
                    f"step {step}: peers hold different batches "
                    f"(checksums {[hex(s) for s in sums]}); "
                    "predictions mode needs data.order=shared and identical data on every peer",
                    report=self.model_id == 0,
                )
            unpack = (
                (lambda row: unpack_topk(row, k, self.payload_dtype, logits.shape, logits.device))
                if k
                else (
                    lambda row: unpack_logits(row, self.payload_dtype, logits.shape, logits.device)
                )
            )
            return [unpack(rows[m]) for m in range(len(rows)) if m != self.model_id]


class WeightExchange(Exchange):
    """Stale copies of the peer models as teachers (Anil et al. 2018), refreshed every k steps.

    Teachers are in eval mode, never get gradients, cost one extra forward per step and
    (M-1) x model memory, and are distilled from on every step once they are worth it.

    Schedule, a pure function of the step (so resume is exact): a refresh is *taken* at steps
    burn_in, burn_in + k, burn_in + 2k, ... and *installed* `delay` steps later (0 <= delay < k).
    The student distils only from step burn_in + delay on, so its first teachers are the peers
    as burn-in ends, never their random initial weights; during burn-in nothing is sent.

    Sharded, off the critical path: the weights are snapshot to a buffer at step t (on the host
    with the MPI wire, on the GPU with NCCL), and non-blocking all-gathers on a private wire (its
    own duplicates of group_comm and peer_comm, or its own process groups, so nothing else can
    interleave with them) move them while training goes on:
      1. group_comm allgather of the floating-point buffers (BatchNorm statistics), averaged:
         the teacher is defined as the peer model with its group-averaged buffers, as evaluation
         uses them, so every rank of a group gets the same teacher (the student's own buffers are
         never changed; skipped when the model has none or G = 1);
      2. peer_comm allgather of this rank's 1/G shard of the model's bytes: group rank r sends
         shard r, so one copy of each model crosses the network per refresh, not G;
      3. group_comm allgather of the M-1 peer shards received, inside the node: every rank
         reassembles all M-1 teachers.
    Each step tests the current stage (Horovod's background thread keeps MPI progressing in
    between; gloo and NCCL progress on their own threads and streams); the step t + delay waits
    for what is left and copies the teachers in. A
    checkpoint finishes a refresh in flight and saves its bytes (`pending_state`), so the
    resumed run installs the identical teachers at the same step.
    """

    mode = Weights
    _AVERAGE, _PEER, _GROUP, _DONE = range(4)  # the stages of a refresh, in order

    def __init__(
        self,
        wire,
        model_id: int,
        every: int,
        model: torch.nn.Module,
        *,
        group_by_link: dict | None = None,
        burn_in_steps: int = 0,
        refresh_delay: int = 0,
        **counting,
    ):
        super().__init__(**counting)
        if not 0 <= refresh_delay < every:
            raise ValueError(f"refresh_delay must be in [0, every={every}), got {refresh_delay}")
        self.model_id, self.every, self.model = model_id, every, model
        self.burn_in, self.delay = int(burn_in_steps), int(refresh_delay)
        # A private wire: refresh stages are posted at steps that depend on test(), so they must
        # not share a communicator or process group with any other collective (logging, ...).
        self.wire = wire.private()
        self.group_by_link = group_by_link or {}
        self.teachers = []
        m = self.wire.size("peer")
        for _ in range(m - 1):
            t = copy.deepcopy(model).eval()
            t.requires_grad_(False)
            self.teachers.append(t)
        self.others = [j for j in range(m) if j != model_id]
        self._layout()
        self._refresh = None  # the refresh in flight: taken_at, install_at, stage, request
        self.installed_from = None  # step the installed teachers were taken at (None: not yet)
        self.wait_seconds = 0.0  # time spent blocked on a refresh at its install step
        atexit.register(_finish_at_exit, weakref.ref(self))

    @classmethod
    def from_config(cls, c, *, comms, wire, model, batch_key, group_by_link=None, **counting):
        return cls(
            wire,
            comms.model_id,
            c.every,
            model,
            group_by_link=group_by_link,
            burn_in_steps=c.burn_in_steps,
            refresh_delay=c.refresh_delay,
            **counting,
        )

    # ---- the schedule: pure functions of the step (the mode's rules)
    def refreshes_at(self, step: int) -> bool:
        return self.mode.exchanges_at(step, every=self.every, burn_in=self.burn_in)

    @property
    def distill_from(self) -> int:
        """First step whose teachers were taken at or after burn-in."""
        return self.mode.distills_from(burn_in=self.burn_in, refresh_delay=self.delay)

    # ---- the payload: the state dict's bytes, in one buffer on the wire's device
    def _layout(self) -> None:
        """Where each tensor of the state dict sits in the payload: floating-point buffers first
        (stage 1 sends that prefix), larger elements first, so every offset is a multiple of its
        element size with no padding; the payload is the model's bytes, padded to G equal shards."""
        state = self.model.state_dict(keep_vars=True)
        averaged = {n for n, b in self.model.named_buffers() if b.is_floating_point()} & set(state)
        keys = sorted(state, key=lambda k: (k not in averaged, -state[k].element_size()))
        self.entries, offset, self.averaged_bytes = (
            [],
            0,
            0,
        )  # entries: (key, offset, nbytes, dtype, shape)
        for key in keys:
            t = state[key]
            offset = -(-offset // t.element_size()) * t.element_size()
            self.entries.append((key, offset, t.numel() * t.element_size(), t.dtype, t.shape))
            offset += t.numel() * t.element_size()
            if key in averaged:
                self.averaged_bytes = offset
        self.averaged = [e for e in self.entries if e[0] in averaged]
        g, m = self.wire.size("group"), self.wire.size("peer")
        if g == 1:  # one rank per model: its buffers are the group's mean
            self.averaged_bytes = 0
        self.nbytes = offset
        self.shard = -(-offset // g)  # S: the bytes each rank of a group sends its peers
        # buffers, allocated once: a refresh is installed before the next one starts
        u8 = {"dtype": torch.uint8, "device": self.wire.device}
        self._flat = torch.zeros(g * self.shard, **u8)  # this model, padded
        self._buffers_in = torch.empty((g, max(self.averaged_bytes, 1)), **u8)
        self._shards_in = torch.empty((m, self.shard), **u8)  # shard r of every model
        self._teachers_in = torch.empty((g, m - 1, self.shard), **u8)  # every shard of the peers

    # ---- a refresh, stage by stage
    def _start(self, taken_at: int, install_at: int) -> None:
        """Snapshot this model to the buffer and post the first stage."""
        flat = self._flat
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, offset, n, _, _ in self.entries:
                flat[offset : offset + n].copy_(
                    state[key].detach().contiguous().view(-1).view(torch.uint8)
                )
        self.count += 1
        self._refresh = {
            "taken_at": taken_at,
            "install_at": install_at,
            "stage": self._AVERAGE,
            "request": None,
        }
        self._post(self._AVERAGE if self.averaged_bytes else self._PEER)

    def _post(self, stage: int) -> None:
        r = self._refresh
        r["stage"], r["request"] = stage, None
        add = self.traffic.add
        if stage == self._AVERAGE:
            # group_comm: every rank's buffers, to average (inside the node when contiguous)
            r["request"] = self.wire.iallgather(
                "group", self._flat[: self.averaged_bytes], self._buffers_in
            )
            add(
                "exchange",
                {link: n * self.averaged_bytes for link, n in self.group_by_link.items()},
            )
        elif stage == self._PEER:
            # peer_comm: shard r of this model to the peers; shard r of each of theirs back
            rank = self.wire.rank("group")
            r["request"] = self.wire.iallgather(
                "peer", self._flat[rank * self.shard : (rank + 1) * self.shard], self._shards_in
            )
            add("exchange", {link: n * self.shard for link, n in self.peers_by_link.items()})
            self.bytes_received += (len(self._shards_in) - 1) * self.shard
        elif stage == self._GROUP:
            # group_comm: the peers' shards this rank received, so that every rank has all of them
            lo, hi = self.others[0], self.others[-1] + 1
            send = (
                self._shards_in[lo:hi]
                if hi - lo == len(self.others)
                else self._shards_in[self.others]
            ).view(-1)
            r["send"] = send  # kept alive until the request completes
            r["request"] = self.wire.iallgather("group", send, self._teachers_in)
            add("exchange", {link: n * send.numel() for link, n in self.group_by_link.items()})

    def _advance(self) -> None:
        """The current stage's request is complete: use its result and post the next stage."""
        stage = self._refresh["stage"]
        if stage == self._AVERAGE:
            self._average_buffers()
            self._post(self._PEER)
        elif stage == self._PEER:
            self._post(self._GROUP)
        elif stage == self._GROUP:
            self._refresh.update(stage=self._DONE, request=None, send=None)

    def _average_buffers(self) -> None:
        """Write the group mean of every floating-point buffer into this model's payload."""
        for _, offset, n, dtype, shape in self.averaged:
            raw = self._buffers_in[:, offset : offset + n].contiguous()
            copies = raw.view(dtype).view(len(raw), *shape)
            self._flat[offset : offset + n].copy_(copies.mean(0).view(-1).view(torch.uint8))

    def _progress(self) -> None:
        """Non-blocking: advance through every stage that has completed."""
        r = self._refresh
        while r["stage"] != self._DONE and r["request"].test():
            self._advance()

    def finish(self) -> None:
        """Block until the refresh in flight (if any) has arrived; installed at its own step."""
        r = self._refresh
        while r is not None and r["stage"] != self._DONE:
            r["request"].wait()
            self._advance()

    def _install(self) -> None:
        start = time.perf_counter()
        self.finish()
        self.wait_seconds += time.perf_counter() - start
        with torch.no_grad():
            for k, teacher in enumerate(self.teachers):
                whole = self._teachers_in[:, k, :].contiguous().view(-1)  # a view when M = 2
                state = teacher.state_dict(keep_vars=True)
                for key, offset, n, dtype, shape in self.entries:
                    state[key].copy_(whole[offset : offset + n].view(dtype).view(shape))
        self.installed_from = self._refresh["taken_at"]
        self._refresh = None

    def exchange(self, step: int | None = None) -> None:
        """A blocking refresh: take this model's weights now and install the peers' at once."""
        device = next(iter(self.model.state_dict().values())).device
        with self._timed(device):
            # one in flight completes first (collectives stay in order), then is replaced
            self.finish()
            self._start(taken_at=step, install_at=step)
            self._install()

    def teacher_logits(self, *, step, x, logits, alpha, y=None):
        # timed as exchange: the copies to and from the device (those sync with it), the Test()s
        if self.refreshes_at(step):
            with self._timed(x.device):
                self._start(taken_at=step, install_at=step + self.delay)
        if self._refresh is not None:
            if step >= self._refresh["install_at"]:
                with self._timed(x.device):
                    self._install()
            else:
                with self._timed():
                    self._progress()
        if alpha == 0 or step < self.distill_from:
            return []
        with torch.no_grad():
            return [t(x) for t in self.teachers]

    # ---- checkpoints: a refresh in flight is finished and its bytes saved (identical on every
    # rank of the group), so that the resumed run installs it at the same step
    def pending_state(self) -> dict | None:
        self.finish()
        r = self._refresh
        if r is None:
            return None
        return {
            "taken_at": r["taken_at"],
            "install_at": r["install_at"],
            "teachers": self._teachers_in.cpu().clone(),
        }

    def load_pending_state(self, state: dict | None) -> None:
        self._refresh = None
        if state is not None:
            self._teachers_in.copy_(state["teachers"])
            self._refresh = {
                "taken_at": state["taken_at"],
                "install_at": state["install_at"],
                "stage": self._DONE,
                "request": None,
            }

    def state_dict(self) -> dict:
        """This rank's counters. A refresh in flight completes first (its non-blocking all-gathers
        among the peers and the group): every rank of the world calls this at the same step."""
        self.finish()
        return {
            **super().state_dict(),
            "installed_from": self.installed_from,
            "wait_seconds": self.wait_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.installed_from, self.wait_seconds = state["installed_from"], state["wait_seconds"]

    def group_state_dict(self) -> dict:
        """The teachers and a refresh not yet installed: the same on every rank of the group."""
        return {
            "teachers": [t.state_dict() for t in self.teachers],
            "pending_refresh": self.pending_state(),
        }

    def load_group_state_dict(self, state: dict) -> None:
        for teacher, teacher_state in zip(self.teachers, state["teachers"]):
            teacher.load_state_dict(teacher_state)
        self.load_pending_state(state["pending_refresh"])


def _finish_at_exit(ref) -> None:
    """Before MPI_Finalize (mpi4py's, which runs after Python's atexit): complete a refresh still
    in flight, e.g. when a script drives train_step itself and ends between a refresh's steps."""
    exchange = ref()
    if exchange is not None:
        exchange.finish()


# mode name -> the exchange that implements it
EXCHANGES = {cls.mode.name: cls for cls in (PredictionExchange, WeightExchange)}


def build_exchange(
    c,
    *,
    comms,
    model: torch.nn.Module,
    batch_key: Callable[[int], tuple],
    wire: Callable[[], object] | None = None,
    traffic: Traffic | None = None,
    peers_by_link: dict | None = None,
    group_by_link: dict | None = None,
) -> Exchange:
    """The exchange for this run's `codistill.*` (c): none when M = 1 or alpha = 0, else the
    mode's (comm/modes.py). `comms`: the rank's communicators; `wire`: the data plane's
    `wire` method (comm/dataplane.py), called only when something travels (every rank calls
    build_exchange at the same point); the *_by_link counts say how many of this rank's peers and
    group sit on its node and on other nodes."""
    counting = {"traffic": traffic, "peers_by_link": peers_by_link}
    if comms.topology.n_models == 1 or c.alpha == 0:
        return NoExchange(**counting)
    return EXCHANGES[c.mode].from_config(
        c,
        comms=comms,
        wire=wire(),
        model=model,
        batch_key=batch_key,
        group_by_link=group_by_link,
        **counting,
    )
