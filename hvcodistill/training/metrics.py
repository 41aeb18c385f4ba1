"""Run-directory outputs: metrics.jsonl (world rank 0), TensorBoard events per model (group rank 0),
summary.json. Ranks that write nothing get a writer that does nothing, not `if rank == 0`
everywhere.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hvcodistill.comm.traffic import COLLECTIVES, LINKS, Traffic
from hvcodistill.files import write_atomic
from hvcodistill.training.timing import Timer


class NullWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    """Per-model scalars to TensorBoard and, gathered over peer_comm, one metrics.jsonl."""

    # seconds: metrics.jsonl's lines go to disk in batches at most this far apart (the first at
    # once), not a write per line; flush() (every checkpoint, the end) writes the rest
    WRITE_EVERY = 1.0

    def __init__(self, run_dir: Path, comms, *, enabled: bool = True):
        self.comms = comms
        self.is_group_root = comms.group_rank == 0
        self.is_world_root = comms.world_rank == 0
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = NullWriter()
        self.jsonl = None
        self._pending: list[str] = []  # metrics.jsonl lines not yet written
        self._written_at: float | None = None
        self._open(purge_step=None)

    def _open(self, purge_step: int | None) -> None:
        if self.enabled and self.is_group_root:
            from torch.utils.tensorboard import SummaryWriter

            fast_event_checksums()

            self.tb = SummaryWriter(
                log_dir=str(self.run_dir / "tb" / f"model_{self.comms.model_id}"),
                purge_step=purge_step,
            )
        if self.enabled and self.is_world_root:
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def resume_at(self, step: int) -> None:
        """After a restart from the checkpoint at `step`, drop what was logged past it (a crash
        between checkpoints logged steps that will now run again), so no step appears twice."""
        self.close()
        if self.enabled and self.is_world_root:
            path = self.run_dir / "metrics.jsonl"
            if path.exists():
                kept = [
                    line
                    for line in path.read_text().splitlines(keepends=True)
                    if _step_of(line) is not None and _step_of(line) <= step
                ]
                write_atomic(path, "".join(kept).encode())
        self._open(purge_step=step + 1)  # TensorBoard hides its events past `step`

    def log(self, step: int, kind: str, scalars: dict) -> list[dict]:
        """Write this model's `scalars` (already averaged over its group); returns every model's
        rows on world rank 0 (empty elsewhere). Called by every rank at the same steps."""
        _add_scalars(self.tb, kind, scalars, step)
        if not self.is_group_root:
            return []
        # peer_comm of group rank 0: one row per model travels to world rank 0 for metrics.jsonl.
        rows = self.comms.peer.gather(
            {
                "step": step,
                "kind": kind,
                "model": self.comms.model_id,
                **{k: float(v) for k, v in scalars.items()},
            },
            root=0,
        )
        if self.jsonl is not None:
            self._pending += [json.dumps(row) + "\n" for row in rows]
            if self._written_at is None or time.monotonic() - self._written_at >= self.WRITE_EVERY:
                self._write_lines()
        return rows or []

    def _write_lines(self) -> None:
        """The pending lines, whole, in one write: a reader (or a resume) never sees half a
        line, short of a crash inside the write."""
        if self._pending:
            self.jsonl.write("".join(self._pending))
            self.jsonl.flush()
            self._pending = []
        self._written_at = time.monotonic()

    def flush(self) -> None:
        """Everything logged so far to disk: at every checkpoint and at the end."""
        self.tb.flush()
        if self.jsonl is not None:
            self._write_lines()

    def close(self) -> None:
        self.tb.close()
        if self.jsonl is not None:
            self._write_lines()
            self.jsonl.close()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`, in C (google-crc32c)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_event_checksums() -> None:
    """TensorBoard's event writer checksums every record in pure Python, about 120 us per KB on
    its writer thread, holding the GIL the training loop needs; a log point's record is about
    1 KB. Its writer takes masked_crc32c from its module: give it the same function in C, when
    google-crc32c is installed (tests/unit/test_metrics.py checks they agree)."""
    try:
        import google_crc32c  # noqa: F401
    except ImportError:
        return
    from tensorboard.summary.writer import record_writer

    record_writer.masked_crc32c = masked_crc32c


def _step_of(line: str) -> int | None:
    """A metrics.jsonl line's step; None for a line a crash cut short."""
    if not line.endswith("\n"):
        return None
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _add_scalars(writer, kind: str, scalars: dict, step: int) -> None:
    """All of a log point's scalars as one TensorBoard event (`kind/name` tags), not one event
    each: a TensorBoard event costs more than a millisecond step can spare per scalar."""
    if isinstance(writer, NullWriter):
        return
    file_writer = getattr(writer, "_get_file_writer", None)  # what add_scalar itself writes to
    if file_writer is None:
        for name, value in scalars.items():
            writer.add_scalar(f"{kind}/{name}", value, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    file_writer().add_summary(
        Summary(
            value=[
                Summary.Value(tag=f"{kind}/{name}", simple_value=float(value))
                for name, value in scalars.items()
            ]
        ),
        step,
    )


def group_mean(comm, values: dict) -> dict:
    """Average a dict of floats over a communicator (one small Allreduce)."""
    keys = sorted(values)
    buf = np.array([float(values[k]) for k in keys], dtype=np.float64)
    out = np.empty_like(buf)
    comm.Allreduce(buf, out, op=MPI.SUM)
    return {k: v / comm.Get_size() for k, v in zip(keys, out.tolist())}


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as indented JSON, written by the one atomic-write rule (hvcodistill/files.py)."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


class Progress:
    """One progress bar, on world rank 0; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total, self.initial = total, initial
        self.t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, info: dict | None = None, force_line: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if info:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
        elif force_line:
            rate = (step - self.initial) / max(1e-9, time.perf_counter() - self.t0)  # this segment
            text = " ".join(f"{k}={v:.4g}" for k, v in (info or {}).items())
            print(
                f"step {step}/{self.total} ({rate:.1f} steps/s) {text}", file=sys.stderr, flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LogWindow:
    """The steps since the last log point: their figures are summed on the device when logged,
    so a step adds no device sync and no tensor op (the accuracy compares all the window's
    predictions with their labels at once); timing and bytes are logged per window."""

    FOLD = 1024  # a long window is summed every FOLD steps

    def __init__(self, start: int, timer: Timer, traffic: Traffic, group_size: int):
        self.start, self.parts, self.samples = start, [], 0
        self.timer, self.traffic, self.group_size = timer, traffic, group_size
        self.timer_before, self.traffic_before = timer.state_dict(), traffic.flat()

    def add(self, parts: dict, samples: int) -> None:
        self.parts.append(parts)
        self.samples += samples
        if len(self.parts) == self.FOLD:
            self.parts = [self._sums()]

    def _sums(self) -> dict:
        """Totals on the device: a step brings its predictions and labels, a fold its `correct`."""
        sums = {
            k: torch.stack(kept).sum() if kept else 0.0
            for k in ("task_loss", "distill_loss")
            for kept in [[p[k] for p in self.parts if k in p]]
        }
        counts = [p["correct"] for p in self.parts if "correct" in p]
        steps = [p for p in self.parts if "predicted" in p]
        if steps:
            predicted = torch.cat([p["predicted"] for p in steps])
            counts.append((predicted == torch.cat([p["labels"] for p in steps])).sum())
        sums["correct"] = sum(counts[1:], counts[0])
        return sums

    def scalars(self, done: int) -> dict:
        """This rank's means over the window: losses, accuracy, bytes by link, seconds per step by
        part (Timer), and the window's exchange seconds."""
        n, sums, now = done - self.start, self._sums(), self.timer.state_dict()
        before = self.timer_before
        per_step = {f"{k}_per_step": (now[k] - before[k]) / n for k in Timer.PARTS}
        return {
            "task_loss": float(sums["task_loss"]) / n,
            "distill_loss": float(sums["distill_loss"]) / n,
            "accuracy": float(sums["correct"]) / self.samples,
            **window_bytes(self.traffic, self.traffic_before, n, self.group_size),
            **per_step,
            "step_s": (now["loop_s"] - before["loop_s"]) / n,
            "exchange_s": now["exchange_s"] - before["exchange_s"],
        }


def window_bytes(traffic: Traffic, before: list, n_steps: int, group_size: int) -> dict:
    """This rank's bytes per step since `before`, by collective and link, scaled by the group size
    so that the group mean logged to TensorBoard is the whole model's bytes per step."""
    names = [f"bytes_{c}_{link}" for c in COLLECTIVES for link in LINKS]
    return {
        name: (now - then) * group_size / n_steps
        for name, now, then in zip(names, traffic.flat(), before)
    }
