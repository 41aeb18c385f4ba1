"""Exchange modes by name: each owns its rules, and config validation, the loop and the planner
ask it rather than compare strings.

A mode says what travels on peer_comm (and its bytes), when (cadence, burn-in, refresh delay),
what it needs from the data order, and what it adds to a step (teacher forwards). The exchange
that moves the bytes lives in comm/exchange.py and names the mode it implements. No torch here:
the planner and config validation use these rules without building a model.
"""

from __future__ import annotations

from hvcodistill.cadence import itstime
from hvcodistill.errors import ConfigError

CHECKSUM_BYTES = 8  # the batch checksum that rides with the logits in predictions mode
INDEX_BYTES = 4  # a top-k payload's int32 class indices
TEACHER_FORWARD = 1 / 3  # a no-grad forward relative to forward + backward (the planner's cost)

MODES: dict[str, type[Mode]] = {}


def register(cls: type[Mode]) -> type[Mode]:
    MODES[cls.name] = cls
    return cls


def get_mode(name: str) -> type[Mode]:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(
            f"config key codistill.mode: {name!r} is not one of {', '.join(MODES)}"
        ) from None


class Mode:
    """The rules of one exchange mode; class methods only (a mode holds no state)."""

    name = ""
    shared_order = False  # peers must hold bit-identical batches (data.order=shared)
    teacher_forwards = False  # each step runs the M - 1 teachers' forward passes

    # ---- configuration
    @classmethod
    def resolve(cls, c) -> None:
        """Fill the codistill keys whose default depends on the mode (null in the file), so the
        resolved config written to run.dir says what the run used."""
        if c.burn_in_steps is None:
            c.burn_in_steps = cls.default_burn_in(c.every)
        if c.refresh_delay is None:
            c.refresh_delay = cls.default_refresh_delay(c.every)

    @classmethod
    def default_burn_in(cls, every: int) -> int:
        return 0

    @classmethod
    def default_refresh_delay(cls, every: int) -> int | None:
        return None

    @classmethod
    def check(cls, c, *, data_order: str) -> None:
        """Rules between keys that this mode imposes; each failure names its key."""
        if cls.shared_order and c.n_models > 1 and data_order != "shared":
            raise ConfigError(
                f"codistill.mode={cls.name} needs data.order=shared: peers must hold the same batch"
            )

    # ---- when: pure functions of the step
    @classmethod
    def exchanges_at(cls, step: int, *, every: int, burn_in: int) -> bool:
        """An exchange (or refresh) is taken at `step`."""
        return itstime(step, every)

    @classmethod
    def distills_from(cls, *, burn_in: int, refresh_delay: int | None) -> int:
        """The first step whose loss has a teacher."""
        return burn_in

    @classmethod
    def hidden_steps(cls, every: int, refresh_delay: int | None = None) -> int:
        """Steps an exchange may travel behind before it is needed (0: it blocks its step)."""
        return 0

    # ---- what it costs (the planner): bytes one rank sends its peers in one exchange
    @classmethod
    def payload_bytes(
        cls,
        *,
        batch: int,
        classes: int,
        value_bytes: int,
        state_bytes: int,
        group_size: int,
        topk: int = 0,
    ) -> int:
        raise NotImplementedError

    @classmethod
    def group_bytes(cls, payload: int, n_models: int) -> int:
        """Bytes one rank sends inside its group per exchange, after the peer transfer."""
        return 0

    @classmethod
    def compute_factor(cls, n_models: int) -> float:
        """A step's compute with this mode relative to without (teacher forwards)."""
        return 1 + (n_models - 1) * TEACHER_FORWARD if cls.teacher_forwards else 1.0


@register
class Predictions(Mode):
    """Every k steps peers allgather the logits of the batch they all hold; distilled from on
    exchange steps. The design card's mode."""

    name = "predictions"
    shared_order = True

    @classmethod
    def payload_bytes(cls, *, batch, classes, value_bytes, state_bytes, group_size, topk=0):
        if topk and topk < classes:
            return batch * topk * (value_bytes + INDEX_BYTES) + CHECKSUM_BYTES
        return batch * classes * value_bytes + CHECKSUM_BYTES


@register
class Weights(Mode):
    """Stale copies of the peer models as teachers (Anil et al. 2018), refreshed every k steps
    after a burn-in; a refresh taken at step t is installed at t + refresh_delay. Sharded: each
    of a model's G ranks sends 1/G of it, and the group reassembles the teachers."""

    name = "weights"
    teacher_forwards = True

    @classmethod
    def default_burn_in(cls, every: int) -> int:
        # the first refresh is then taken at step k: the first teachers are the peers after one
        # interval of training, never their random initial weights
        return every

    @classmethod
    def default_refresh_delay(cls, every: int) -> int:
        return min(10, every // 2)

    @classmethod
    def check(cls, c, *, data_order: str) -> None:
        super().check(c, data_order=data_order)
        if c.refresh_delay >= c.every:
            raise ConfigError(
                f"config key codistill.refresh_delay must be < codistill.every={c.every} "
                f"(a refresh is installed before the next one is taken), got {c.refresh_delay}"
            )

    @classmethod
    def exchanges_at(cls, step, *, every, burn_in):
        return itstime(step, every, offset=burn_in)

    @classmethod
    def distills_from(cls, *, burn_in, refresh_delay):
        return burn_in + (refresh_delay or 0)

    @classmethod
    def hidden_steps(cls, every, refresh_delay=None):
        return cls.default_refresh_delay(every) if refresh_delay is None else refresh_delay

    @classmethod
    def payload_bytes(cls, *, batch, classes, value_bytes, state_bytes, group_size, topk=0):
        return -(-state_bytes // group_size)

    @classmethod
    def group_bytes(cls, payload, n_models):
        return (n_models - 1) * payload
