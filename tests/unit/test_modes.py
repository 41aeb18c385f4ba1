"""Weights mode's refresh settings, without MPI: the defaults that depend on the mode, and bad
values."""

import pytest

from hvcodistill.config import load_config
from hvcodistill.errors import ConfigError


def codistill(*overrides):
    return load_config(None, ["train.steps=10", *overrides]).codistill


@pytest.mark.parametrize(
    "every,burn_in,delay", [(1, 1, 0), (2, 2, 1), (7, 7, 3), (50, 50, 10), (2500, 2500, 10)]
)
def test_weights_mode_defaults_burn_in_k_and_delay(every, burn_in, delay):
    c = codistill("codistill.mode=weights", f"codistill.every={every}")
    assert (c.burn_in_steps, c.refresh_delay) == (burn_in, delay)


def test_predictions_mode_keeps_no_burn_in_and_explicit_values_win():
    c = codistill("codistill.every=10")
    assert c.burn_in_steps == 0 and c.refresh_delay is None
    c = codistill(
        "codistill.mode=weights",
        "codistill.every=50",
        "codistill.burn_in_steps=0",
        "codistill.refresh_delay=0",
    )
    assert (c.burn_in_steps, c.refresh_delay) == (0, 0)
    assert codistill("codistill.mode=weights", "codistill.burn_in_steps=null").burn_in_steps == 1


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["codistill.mode=weights", "codistill.every=5", "codistill.refresh_delay=5"],
            "must be < codistill.every=5",
        ),
        (["codistill.mode=weights", "codistill.refresh_delay=-1"], "must be >= 0"),
        (["codistill.burn_in_steps=-1"], "codistill.burn_in_steps must be >= 0"),
    ],
)
def test_bad_refresh_settings_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match="codistill") as e:
        codistill(*overrides)
    assert needle in str(e.value)
