"""The errors that end a run, each with the exit code a user (or sbatch script) sees.

Every exit code of the package is defined here, once (docs/running.md lists them). An error
knows whether every rank raises it at the same point (`agreed`: the job exits with its code) or
one rank alone found it (the job is aborted with its code), and which rank says so:
`comm.agreement.speak` turns it into one line and the exit.
"""

from __future__ import annotations


class HvcodistillError(Exception):
    """A run that cannot go on. `agreed`: every rank raises it at the same point. `says`: this
    rank prints the line (None: world rank 0 when agreed, else this rank)."""

    exit_code = 1

    def __init__(self, message: str = "", *, agreed: bool = False, says: bool | None = None):
        super().__init__(message)
        self.agreed, self.says = agreed, says

    def line(self) -> str:
        return f"hvcodistill: error: {self}"


class ConfigError(HvcodistillError):
    """Bad user input; the message is one line naming the key or file."""

    exit_code = 2


class DataMismatchError(HvcodistillError):
    """Ranks hold different data: the start-up fingerprint, or an exchange's batch checksum."""

    exit_code = 3


class NonFiniteError(HvcodistillError):
    """A loss or the weights became NaN/Inf: every rank stopped at one step, nothing saved."""

    exit_code = 4


class CheckpointWriteError(HvcodistillError):
    """A checkpoint could not be written (disk full, unwritable): EX_IOERR."""

    exit_code = 74


class Preempted(HvcodistillError):
    """Every rank stopped at one step and wrote a checkpoint: EX_TEMPFAIL, the sbatch script
    turns it into `scontrol requeue`."""

    exit_code = 75

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}", agreed=True)
        self.step, self.signal_name = step, signal_name

    def line(self) -> str:
        return f"hvcodistill: {self}; checkpoint written, exiting {self.exit_code} to be requeued"


class Interrupted(HvcodistillError):
    """SIGINT (Ctrl-C): 128 + SIGINT, what a shell reports."""

    exit_code = 130

    def line(self) -> str:
        return f"hvcodistill: {self}"


EXIT_FAILED = HvcodistillError.exit_code
EXIT_BAD_INPUT = ConfigError.exit_code
EXIT_DATA_MISMATCH = DataMismatchError.exit_code
EXIT_NON_FINITE = NonFiniteError.exit_code
EXIT_IO_ERROR = CheckpointWriteError.exit_code
EXIT_PREEMPTED = Preempted.exit_code
EXIT_INTERRUPTED = Interrupted.exit_code
