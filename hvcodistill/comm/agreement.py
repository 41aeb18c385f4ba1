"""The ranks agree before they act, and one function speaks for the job when it ends early.

Bad input can differ between ranks (a file missing on one node): `agree` makes every rank learn
of it over COMM_WORLD before the first collective that a failed rank would never join. `speak`
turns the error that ends a run into its one line and exit code (errors.py): an error every rank
raised together exits normally; one that a rank found alone aborts the job, the others may be
waiting in a collective.
"""

from __future__ import annotations

import multiprocessing
import sys
import traceback

from mpi4py import MPI

from hvcodistill.data.fingerprint import data_fingerprint
from hvcodistill.errors import (
    EXIT_FAILED,
    ConfigError,
    DataMismatchError,
    HvcodistillError,
    Interrupted,
)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def agree(world, fn):
    """Run `fn` on every rank; if any rank's input is bad (ConfigError), every rank raises it,
    and the first failed rank says why (naming itself when others did not fail)."""
    try:
        value, error = fn(), None
    except ConfigError as e:
        value, error = None, str(e)
    # COMM_WORLD: everyone's verdict, so all ranks go on or stop together
    errors = world.allgather(error)
    failed = [r for r, e in enumerate(errors) if e]
    if not failed:
        return value
    where = f" (rank {failed[0]})" if len(failed) < len(errors) else ""
    raise _Agreed(
        f"hvcodistill: error{where}: {errors[failed[0]]}", says=world.Get_rank() == failed[0]
    )


class _Agreed(ConfigError):
    """Bad input every rank stops on together; the line is written as the failed rank saw it."""

    def __init__(self, line: str, says: bool):
        super().__init__(line, agreed=True, says=says)

    def line(self) -> str:
        return str(self)


def check_same_data(world, data, path: str) -> None:
    """COMM_WORLD: every rank read its data from its own disk (`path`: its data.path); they must
    hold the same content, or ranks would take different numbers of steps (a hang) or train and
    distil across different samples. Compared once: the sizes and a content fingerprint. On a
    mismatch every rank raises DataMismatchError, world rank 0 naming two ranks that differ."""
    try:
        sizes = (len(data.train), len(data.val), tuple(data.input_shape), data.num_classes)
        mine, error = (*sizes, data_fingerprint(data)), None
    except OSError as e:  # a lazy set's file vanished or is unreadable: bad input
        mine, error = None, f"data.path {path!r}: cannot read {e.filename or ''}: {e.strerror or e}"
    # COMM_WORLD: everyone's summary (a few dozen bytes), so every rank reaches the same verdict
    every = world.allgather((mine, error, path))
    errors = [e for _, e, _ in every if e]
    if errors:
        raise ConfigError(errors[0], agreed=True, says=world.Get_rank() == 0)
    odd = next((r for r, (s, _, _) in enumerate(every) if s != every[0][0]), None)
    if odd is None:
        return
    (*sizes0, fp0), _, path0 = every[0]
    (*sizes1, fp1), _, path1 = every[odd]
    what = (
        f"fingerprints {fp0[:12]} and {fp1[:12]}"
        if sizes0 == sizes1
        else f"(train, val, shape, classes) = {tuple(sizes0)} and {tuple(sizes1)}"
    )
    raise DataMismatchError(
        f"ranks hold different data: rank 0 (data.path={path0!r}) and rank {odd} "
        f"(data.path={path1!r}) differ, {what}; every rank must read identical data (the same "
        "files on every node, or data.path on a shared file system)",
        agreed=True,
    )


def speak(error: BaseException) -> int:
    """This rank's part in ending the job on `error`: its line (on the rank that says it), then
    the exit code (every rank raised it together) or an abort (this rank alone knows)."""
    rank = MPI.COMM_WORLD.Get_rank()
    if isinstance(error, SystemExit):
        raise error
    if isinstance(error, KeyboardInterrupt):
        # SIGINT outside the watchdog's span (it makes Ctrl-C exit 130 by itself)
        error = Interrupted("interrupted (SIGINT)")
    if not isinstance(error, HvcodistillError):
        # any other failure on one rank would leave the others waiting in a collective
        traceback.print_exc()
        sys.stderr.flush()
        abort(EXIT_FAILED)
        return EXIT_FAILED
    if error.agreed:
        if error.says if error.says is not None else rank == 0:
            say(error.line())
        return error.exit_code
    if error.says is not False:
        say(_lone_line(error, rank))
    abort(error.exit_code)
    return error.exit_code


def _lone_line(error: HvcodistillError, rank: int) -> str:
    """The line of an error one rank found alone. Bad input met in a batch may come back from a
    DataLoader worker with its traceback in the message: its last line is the one that says."""
    if not isinstance(error, ConfigError):
        return error.line()
    text = str(error).strip()
    line = text.splitlines()[-1] if text else type(error).__name__
    line = line.split(f"{ConfigError.__module__}.{ConfigError.__name__}: ", 1)[-1]
    return f"hvcodistill: error (rank {rank}): {line}"


def abort(code: int) -> None:
    """End the whole job from this rank (the others may wait in a collective). DataLoader
    workers go first: children of a forkserver, the abort would leave them running."""
    for child in multiprocessing.active_children():
        child.terminate()
    MPI.COMM_WORLD.Abort(code)
