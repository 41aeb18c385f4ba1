"""Where a rank's training-loop time goes, all segments of a resumed run added up."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Timer:
    """The loop is timed in laps: each lap's time goes to one part, less the waits timed inside
    it (the all-reduce wait by train_step, the exchange by the exchange's own `seconds`), which
    go to theirs. So the parts add up to loop_s exactly (up to float rounding). On a GPU kernels
    run asynchronously: time lands where the host waits for them."""

    compute_s: float = 0.0  # forward, loss, backward, lr/wd and optimiser update, less the waits
    allreduce_s: float = 0.0  # waiting for the group's gradient all-reduce
    exchange_s: float = 0.0  # peer exchanges, staging to and from the host included
    eval_s: float = 0.0  # validations inside the loop (train.eval_every)
    checkpoint_s: float = 0.0  # checkpoints inside the loop: gather, serialise, write, fsync
    data_s: float = 0.0  # waiting for the next batch from the loader, and its copy to the device
    other_s: float = 0.0  # the rest: schedules, metrics and logging, preemption checks
    loop_s: float = 0.0  # the training loop, first batch requested to last update done
    cpu_s: float = 0.0  # this process's CPU time over the loop (all its threads)
    wall_s: float = 0.0  # the whole run's wall time up to the last checkpoint, all segments
    started: float = field(default_factory=time.perf_counter)  # this segment's start
    wall_before: float = 0.0  # earlier segments' wall time (a resumed run)

    PARTS = (
        "compute_s",
        "allreduce_s",
        "exchange_s",
        "eval_s",
        "checkpoint_s",
        "data_s",
        "other_s",
    )
    KEPT = (*PARTS, "loop_s", "cpu_s", "wall_s")

    def start(self, exchange) -> None:
        """Laps count from now; `exchange.seconds` is the exchange's running time."""
        self._exchange = exchange
        self._mark, self._waits = time.perf_counter(), (self.allreduce_s, exchange.seconds)
        self._cpu_mark = time.process_time()

    def stop(self) -> None:
        """The loop is over: its CPU time is added (read at the start and the end, not per lap)."""
        self.cpu_s, self._cpu_mark = self.cpu_seconds(), None

    def cpu_seconds(self) -> float:
        mark = getattr(self, "_cpu_mark", None)
        return self.cpu_s + (time.process_time() - mark if mark is not None else 0.0)

    def lap(self, part: str) -> None:
        """The time since the last lap goes to `part`, less the waits timed inside it."""
        now, allreduce, exchange = time.perf_counter(), self.allreduce_s, self._exchange.seconds
        exchanged = exchange - self._waits[1]
        self.exchange_s += exchanged
        self.__dict__[part] += now - self._mark - (allreduce - self._waits[0]) - exchanged
        self.loop_s += now - self._mark
        self._mark, self._waits = now, (allreduce, exchange)

    def wall_seconds(self) -> float:
        """This run's wall time, earlier segments included."""
        return self.wall_before + time.perf_counter() - self.started

    def segment_seconds(self) -> float:
        return time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.KEPT}, "cpu_s": self.cpu_seconds()}

    def load_state_dict(self, state: dict) -> None:
        for name in self.KEPT:
            setattr(self, name, float(state[name]))
        self.wall_before = self.wall_s
