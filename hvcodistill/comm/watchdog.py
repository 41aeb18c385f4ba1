"""Never hang on a lost rank or node, and act on the signals that the main thread cannot.

A thread on every rank, from before set-up to the end of the run (train.py run()):

- **Heartbeat.** Every INTERVAL seconds it joins a non-blocking MAX all-reduce over its own copy of
  COMM_WORLD, carrying [stop signal, SIGINT, still in set-up, not closing]. A round completes only
  once every rank has posted it, and the thread posts, tests and reads it whatever the main
  thread is doing (computing, writing a checkpoint, blocked in a collective). A round that has not
  completed after `timeout` seconds (run.hang_timeout) means a rank is gone: killed, its node
  down, its link cut, or frozen. This rank then prints one line and aborts the job (MPI_Abort;
  os._exit if even that does not return), so no rank waits in a collective until the time limit.
  Launchers see a dead process by themselves (mpirun in about 2 s); the heartbeat bounds what they
  cannot see: a node that stops answering or a cut link (TCP retransmits for many minutes), and
  srun without --kill-on-bad-exit.
- **Signals.** Python runs signal handlers in the main thread only, between bytecodes: a rank
  blocked in a collective or a long C call never runs them. The thread reads every signal from the
  wakeup fd instead, and the next heartbeat tells every rank:
  - SIGUSR1/SIGTERM before every rank has finished its first step (set-up: data, model, resume):
    all ranks exit EXIT_PREEMPTED (75) at once. Nothing was trained in this segment, so there is
    nothing to checkpoint: running the command again resumes from the newest checkpoint there is.
    From the first step on, the PreemptionGuard stops the run at a step with a checkpoint.
  - SIGINT (Ctrl-C): all ranks exit EXIT_INTERRUPTED (130) at once, world rank 0 saying
    "interrupted"; no checkpoint is written, the newest one stays the resume point.
  - a second stop signal or SIGINT on one rank ends that rank at once (exit 128 + signal), as if
    it were not handled: the way out when the first could not be acted on.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from hvcodistill.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
WAKE = b"\0"  # written by close(); signal numbers are > 0


class Watchdog:
    INTERVAL = 0.5  # seconds between heartbeats
    POLL = 0.05  # seconds between tests of a heartbeat in flight
    ABORT_GRACE = 5.0  # seconds MPI_Abort gets before this process exits by itself
    CLOSE_WAIT = 300.0  # seconds close() waits for the other ranks to close

    def __init__(self, world, *, timeout: float = 15.0, stepped=lambda: False):
        self.rank = world.Get_rank()
        self.timeout = timeout  # run.hang_timeout: seconds; 0: never abort on silence
        self.stepped = stepped  # has this rank finished its first step?
        # COMM_WORLD's copy (collective, here on every rank alike): heartbeats never match the
        # trainer's own collectives.
        self._comm = world.Dup()
        self._send = np.zeros(4, dtype=np.float64)  # [stop signal, SIGINT, in set-up, not closing]
        self._recv = np.zeros(4, dtype=np.float64)
        self._stop = self._interrupt = 0
        self._closing = False
        self._setup_stops = 0  # consecutive rounds saying: stopped during set-up
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        # Ctrl-C raises no KeyboardInterrupt in the main thread: the thread acts on it.
        self._previous_int = signal.signal(signal.SIGINT, lambda signum, frame: None)
        self._thread = threading.Thread(target=self._loop, name="hvcodistill-watchdog", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            self._send[:] = (self._stop, self._interrupt, not self.stepped(), not self._closing)
            # the copy of COMM_WORLD: is every rank alive, and has any been signalled?
            request = self._comm.Iallreduce(self._send, self._recv, op=MPI.MAX)
            posted = time.monotonic()
            while not request.Test():
                self._read_signals(self.POLL)
                if self.timeout and time.monotonic() - posted > self.timeout:
                    self._lost(time.monotonic() - posted)
            stop, interrupt, setup, running = (int(v) for v in self._recv)
            if interrupt:
                self._exit(
                    EXIT_INTERRUPTED,
                    "interrupted (SIGINT): stopped without writing a checkpoint; "
                    "run the same command to resume from the newest one in run.dir",
                )
            # A rank's post can predate its first step by one interval, so "in set-up" must hold in
            # two consecutive rounds: the second is posted at once, after every rank saw the first
            # (all ranks read the same rounds, so all decide alike). A run already training leaves
            # the stop to the PreemptionGuard, which checkpoints first.
            self._setup_stops = self._setup_stops + 1 if stop and setup else 0
            if self._setup_stops >= 2:
                self._exit(
                    EXIT_PREEMPTED,
                    f"stopped by {signal.Signals(stop).name} during set-up, before "
                    f"the first step: nothing to checkpoint, exiting {EXIT_PREEMPTED}; run the "
                    "same command to resume from the newest checkpoint in run.dir",
                )
            if not running:  # every rank has closed: none posts another
                return
            if not self._closing and not self._setup_stops:  # a stop to confirm: post again now
                self._read_signals(self.INTERVAL)

    def _read_signals(self, timeout: float) -> None:
        """Wait up to `timeout` for signals (or close()'s wake-up) and note them."""
        if not select.select([self._read], [], [], timeout)[0]:
            return
        try:
            data = os.read(self._read, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum not in (signal.SIGINT, *STOP_SIGNALS):
                continue
            if self._stop or self._interrupt:
                if self._setup_stops or self._interrupt:
                    # the ranks are stopping (interrupted, or a stop in set-up being agreed); a
                    # faster one has left and the launcher now signals the rest: leave at once,
                    # with the code of what was asked first
                    os._exit(EXIT_INTERRUPTED if self._interrupt else EXIT_PREEMPTED)
                self._say(
                    f"second {signal.Signals(signum).name}: exiting now, without a checkpoint",
                    everywhere=True,
                )
                os._exit(128 + signum)
            if signum == signal.SIGINT:
                self._interrupt = 1
            else:
                self._stop = signum

    def _lost(self, waited: float) -> None:
        self._say(
            f"error (rank {self.rank}): no heartbeat from every rank for {waited:.0f} s "
            f"(run.hang_timeout={self.timeout:g}): a rank or node is lost, or the network is cut; "
            "aborting the job. Run the same command again to resume from the newest checkpoint "
            "in run.dir",
            everywhere=True,
        )
        # MPI_Abort needs the launcher's daemons; if they are out of reach too, leave anyway.
        threading.Timer(self.ABORT_GRACE, os._exit, args=(EXIT_FAILED,)).start()
        MPI.COMM_WORLD.Abort(EXIT_FAILED)
        os._exit(EXIT_FAILED)

    def _exit(self, code: int, message: str) -> None:
        """Every rank reads the same heartbeat, so all leave together; world rank 0 says why."""
        self._say(message)
        os._exit(code)

    def _say(self, message: str, everywhere: bool = False) -> None:
        if everywhere or self.rank == 0:
            print(f"hvcodistill: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()

    # ---------------------------------------------------------------- the main thread
    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, kind, error, tb) -> None:
        # an ending every rank shares closes together; a failure aborts the job, thread and all
        if kind is None or getattr(error, "agreed", False):
            self.close()

    def close(self) -> None:
        """Every rank, at the same point (the end of the run, or an exit all ranks take together):
        heartbeats go on until every rank has closed, then no rank's thread posts another. Waits
        for the others at most CLOSE_WAIT seconds (they are alive, or the heartbeat would have
        aborted): a rank that closes alone aborts the job rather than leave it waiting."""
        if self._write is None:
            return
        self._closing = True
        try:
            os.write(self._write, WAKE)
        except BlockingIOError:
            pass
        self._thread.join(self.CLOSE_WAIT)
        if self._thread.is_alive():
            self._say(
                f"error (rank {self.rank}): the other ranks did not finish within "
                f"{self.CLOSE_WAIT:g} s "
                "of this one; aborting the job",
                everywhere=True,
            )
            MPI.COMM_WORLD.Abort(EXIT_FAILED)
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGINT, self._previous_int)
        os.close(self._read)
        os.close(self._write)
        self._write = None
