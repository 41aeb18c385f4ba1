"""The one cadence predicate: log, exchange, refresh, evaluate and checkpoint steps.

A pure function of the step, so every rank decides alike and a resumed run decides as before.
(The preemption check keeps its own time-based interval: comm/preemption.py.)
"""

from __future__ import annotations


def itstime(
    step: int,
    every: int,
    *,
    total_steps: int | None = None,
    first: bool = True,
    last: bool | None = None,
    offset: int = 0,
) -> bool:
    """True when `every` > 0 divides `step - offset` (at `offset` itself only if `first`; never
    before it). At `total_steps` the answer is `last` when that is given: True for what the end
    must do (the last log point), False for what the end does anyway (validation, checkpoint)."""
    if last is not None and total_steps is not None and step == total_steps:
        return last
    since = step - offset
    return bool(every and every > 0 and since >= 0 and since % every == 0 and (first or since > 0))
