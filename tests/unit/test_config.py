"""The configuration (config.py): files and overrides, types, choices, ranges and limits, each bad
value one line naming the key; run.dir values; checks against the data at start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvcodistill.config import (
    CHOICES,
    MAX_SEED,
    MAX_WORKERS,
    Config,
    check_against_data,
    load_config,
    start_warnings,
)
from hvcodistill.data import BatchPlan
from hvcodistill.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _err(path=None, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(str(path) if path else None, list(overrides))
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_defaults_need_steps_or_epochs():
    assert "train.steps" in _err()
    cfg = load_config(None, ["train.steps=5"])
    assert isinstance(cfg, Config) and cfg.train.steps == 5 and cfg.codistill.n_models == 2
    assert "train.steps" in _err(overrides=["train.steps=5", "train.epochs=2"])


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("codistill:\n  every: 4\n  alpha: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(str(p), [])
    assert (cfg.codistill.every, cfg.codistill.alpha, cfg.train.epochs) == (4, 0.5, 3.0)
    cfg = load_config(str(p), ["codistill.every=7"])
    assert cfg.codistill.every == 7 and cfg.codistill.alpha == 0.5


def test_override_types():
    cfg = load_config(
        None,
        [
            "train.steps=5",
            "codistill.every=10",
            "model.hidden=[64,32]",
            "optim.lr=null",
            "data.augment=true",
            "optim.lr_gamma=0.5",
        ],
    )
    assert cfg.codistill.every == 10 and type(cfg.codistill.every) is int
    assert cfg.model.hidden == [64, 32]
    assert cfg.optim.lr is None and cfg.data.augment is True and cfg.optim.lr_gamma == 0.5
    assert load_config(None, ["train.steps=5", "optim.lr=0.3"]).optim.lr == 0.3


def test_exponent_numbers_are_numbers(tmp_path):
    assert (
        load_config(None, ["train.steps=5", "optim.weight_decay=1e-5"]).optim.weight_decay == 1e-5
    )
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  weight_decay: 1e-4\ntrain:\n  steps: 5\n")
    assert load_config(str(p), []).optim.weight_decay == 1e-4


@pytest.mark.parametrize("key", ["codistill.foo", "nosuch.every", "codistill"])
def test_unknown_override_key(key):
    assert key in _err(overrides=["train.steps=5", f"{key}=1"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  batchsize: 8\n")
    assert "train.batchsize" in _err(p)


@pytest.mark.parametrize(
    "item,key",
    [
        ("codistill.every=abc", "codistill.every"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("data.augment=1", "data.augment"),
        ("model.hidden=64", "model.hidden"),
    ],
)
def test_wrong_type(item, key):
    assert key in _err(overrides=["train.steps=5", item])


def test_infinite_integer_is_config_error():
    assert "train.steps" in _err(overrides=["train.steps=.inf"])


def test_bad_choice_lists_choices():
    msg = _err(overrides=["train.steps=5", "codistill.mode=gossip"])
    assert "codistill.mode" in msg and "gossip" in msg and "predictions" in msg and "weights" in msg


def test_predictions_needs_shared_order():
    base = ["train.steps=5", "codistill.mode=predictions", "data.order=disjoint"]
    assert "data.order" in _err(overrides=base + ["codistill.n_models=2"])
    assert load_config(None, base + ["codistill.n_models=1"]).data.order == "disjoint"
    assert (
        load_config(
            None, base[:1] + ["codistill.mode=weights", "data.order=disjoint"]
        ).codistill.mode
        == "weights"
    )


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    assert str(p) in _err(p)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [5\n  epochs: : :\n")
    assert str(p) in _err(p)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(str(path), [])
    assert (cfg.train.steps > 0) != (cfg.train.epochs > 0)


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 2


def test_empty_section_is_allowed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\ntrain:\n  steps: 5\n")
    assert load_config(str(p), []).train.steps == 5


# ------------------------------------------------------------------------ names: the registries
def test_choices_are_the_registries():
    from hvcodistill.comm.dataplane import BACKENDS
    from hvcodistill.comm.exchange import PAYLOAD_DTYPES
    from hvcodistill.comm.modes import MODES
    from hvcodistill.data import DATA_NAMES
    from hvcodistill.losses import DISTANCES
    from hvcodistill.models import MODEL_NAMES
    from hvcodistill.optim import LR_SCHEDULES, UNITS
    from hvcodistill.training.build import OPTIMIZERS

    registries = {
        "codistill.mode": MODES,
        "codistill.distance": DISTANCES,
        "codistill.payload_dtype": PAYLOAD_DTYPES,
        "data.name": DATA_NAMES,
        "model.name": MODEL_NAMES,
        "optim.name": OPTIMIZERS,
        "optim.unit": UNITS,
        "optim.lr_schedule": LR_SCHEDULES,
        "train.backend": BACKENDS,
    }
    for key, registry in registries.items():
        assert CHOICES[key] is registry, key
    # a mode registered after config was imported is a valid name at once
    assert "predictions" in CHOICES["codistill.mode"] and "weights" in CHOICES["codistill.mode"]


def test_config_imports_no_command():
    code = (
        "import sys, hvcodistill.config; "
        "print([m for m in ('hvcodistill.train', 'hvcodistill.training.loop') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("key", sorted(CHOICES))
@pytest.mark.parametrize("value", ["false", "1", "[a]"])
def test_choice_key_given_no_string_lists_the_choices(key, value):
    msg = _err(overrides=["train.steps=5", f"{key}={value}"])
    assert key in msg and f"is not one of {', '.join(CHOICES[key])}" in msg


def test_amp_no_says_what_yaml_read(tmp_path):
    msg = _err(overrides=["train.steps=5", "train.amp=no"])
    assert msg.startswith("config key train.amp: False is not one of none, bf16, fp16"), msg
    assert "yes/no" in msg
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  amp: off\n")
    assert "is not one of none, bf16, fp16" in _err(p)
    assert load_config(None, ["train.steps=5", "train.amp='bf16'"]).train.amp == "bf16"


# ----------------------------------------------------------------------------- values and limits
@pytest.mark.parametrize(
    "item,key",
    [
        ("optim.lr_milestones=[1,a]", "optim.lr_milestones"),
        ("optim.lr_milestones=[.nan]", "optim.lr_milestones"),
        ("optim.lr_milestones=[true]", "optim.lr_milestones"),
        ("optim.wd_milestones=[.inf]", "optim.wd_milestones"),
        ("train.seed=100000000000000000000000", "train.seed"),
        ("train.seed=-1", "train.seed"),
        ("model.init_seed=9223372036854775808", "model.init_seed"),
        ("model.hidden=[true]", "model.hidden"),
        ("model.hidden=[64,.inf]", "model.hidden"),
        ("data.synthetic_shape=[3,false]", "data.synthetic_shape"),
        ("data.workers=100000000", "data.workers"),
        ("optim.lr=1" + "0" * 400, "optim.lr"),  # an int too large for a float
        ("optim.momentum=.nan", "optim.momentum"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(item, key):
    assert key in _err(overrides=["train.steps=5", item])


def test_non_finite_weight_decay_value_is_refused():
    # lr=.inf was refused, wd_values=[.inf] trained to a NaN loss: one rule for every number now
    assert "optim.wd_values" in _err(
        overrides=["train.steps=5", "optim.wd_milestones=[1]", "optim.wd_values=[.inf]"]
    )
    assert "optim.wd_values" in _err(
        overrides=["train.steps=5", "optim.wd_milestones=[1]", "optim.wd_values=[.nan]"]
    )
    assert "optim.lr" in _err(overrides=["train.steps=5", "optim.lr=.inf"])


def test_values_at_the_limits_are_taken():
    cfg = load_config(
        None,
        [
            "train.steps=5",
            f"train.seed={MAX_SEED}",
            f"data.workers={MAX_WORKERS}",
            "optim.lr_milestones=[0.5, 2]",
            "optim.wd_milestones=[1]",
            "optim.wd_values=[1e-5]",
            "model.hidden=[64, 32]",
        ],
    )
    assert cfg.train.seed == MAX_SEED and cfg.data.workers == MAX_WORKERS
    assert (
        cfg.optim.lr_milestones == [0.5, 2] and type(cfg.optim.lr_milestones[1]) is int
    )  # steps stay ints
    assert cfg.optim.wd_values == [1e-5] and cfg.model.hidden == [64, 32]
    # the largest seed gives a valid data order (the plan's seed product is taken modulo 2**64)
    plan = BatchPlan(
        n_samples=10,
        batch_size=2,
        group_size=1,
        group_rank=0,
        n_models=1,
        model_id=0,
        order="shared",
        seed=MAX_SEED,
    )
    assert len(plan.key(0)[1]) == 2


def test_seed_limit_is_what_torch_takes():
    torch.Generator().manual_seed(MAX_SEED + 8)  # + model id: still taken
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2**64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=transformer_lm"], "does not fit data.name=digits"),
        (["data.name=text"], "model.name=mlp does not fit data.name=text"),
        (
            ["data.name=text", "model.name=transformer_lm", "model.width=30", "model.heads=4"],
            "multiple of model.heads",
        ),
        (
            ["data.name=text", "model.name=transformer_lm", "model.context=0"],
            "model.context must be >= 1",
        ),
        (["codistill.topk=-1"], "codistill.topk must be >= 0"),
    ],
)
def test_language_model_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.steps=10", *overrides])


# ----------------------------------------------------------------------------- null means unset
def test_null_epochs_or_steps_means_unset(tmp_path):
    cfg = load_config(None, ["train.steps=5", "train.epochs=null"])
    assert cfg.train.steps == 5 and cfg.train.epochs == 0.0 and type(cfg.train.epochs) is float
    cfg = load_config(None, ["train.epochs=2", "train.steps=null"])
    assert cfg.train.epochs == 2.0 and cfg.train.steps == 0 and type(cfg.train.steps) is int
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 7\n  epochs: null\n")
    assert load_config(str(p)).train.steps == 7
    assert "train.batch_size" in _err(overrides=["train.steps=5", "train.batch_size=null"])


# ----------------------------------------------------------------------------- config files
def test_duplicate_key_names_key_file_and_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  batch_size: 8\n  steps: 6\n")
    msg = _err(p)
    assert str(p) in msg and "train.steps" in msg and "line 4" in msg and "line 2" in msg, msg
    p.write_text("train:\n  steps: 5\nrun:\n  dir: a\ntrain:\n  batch_size: 8\n")
    msg = _err(p)
    assert str(p) in msg and "key train " in msg and "line 5" in msg and "line 1" in msg, msg


def test_tab_names_file_line_and_column(tmp_path):
    p = tmp_path / "tab.yaml"
    p.write_text("train:\n  steps: 5\n\tbatch_size: 8\n")
    msg = _err(p)
    assert str(p) in msg and "line 3, column 1" in msg and "tab" in msg, msg


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n", "{}\n", "run:\ntrain:\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    assert _err(p) == f"config file {p} is empty: it sets no key"


def test_no_config_file_keeps_working_for_library_use():
    assert load_config(None, ["train.steps=3"]).train.steps == 3


def test_shipped_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name is looked up
    by_path = load_config(str(CONFIGS[0]))
    assert load_config(CONFIGS[0].stem) == by_path
    assert load_config(CONFIGS[0].name) == by_path
    assert "config file no_such_config not found" in _err("no_such_config")


def test_non_utf8_config_file_names_the_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train:\n  steps: 5\n# caf\xe9\n".encode("latin-1"))
    msg = _err(p)
    assert str(p) in msg and "UTF-8" in msg


def test_config_path_that_is_a_directory_says_so(tmp_path):
    msg = _err(tmp_path)
    assert str(tmp_path) in msg and "directory" in msg and "not found" not in msg


# ----------------------------------------------------------------------------- run.dir
@pytest.mark.parametrize("value", ["", "' '"])
def test_empty_run_dir_is_refused(value):
    msg = _err(overrides=["train.steps=5", f"run.dir={value}"])
    assert msg.startswith("config key run.dir must not be empty"), msg


def test_run_dir_name_too_long_is_refused(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert load_config(None, ["train.steps=5", f"run.dir={tmp_path / ('x' * limit) / 'a'}"])
    # one character too many; as many characters as allowed, twice the bytes in UTF-8
    for part, size in (("x" * (limit + 1), limit + 1), ("é" * limit, 2 * limit)):
        msg = _err(overrides=["train.steps=5", f"run.dir={tmp_path / part / 'run'}"])
        assert msg.startswith("config key run.dir:") and f"is {size} bytes long" in msg, msg


# ---------------------------------------------------------------------- after the data, at start
def test_topk_at_or_above_the_classes_is_refused():
    cfg = load_config(None, ["train.steps=5", "codistill.topk=10"])
    with pytest.raises(ConfigError) as e:
        check_against_data(cfg, 10)
    assert str(e.value).startswith("config key codistill.topk must be < the data's 10 classes")
    check_against_data(cfg, 11)
    check_against_data(load_config(None, ["train.steps=5"]), 2)  # 0: every logit


def test_a_run_shorter_than_its_burn_in_is_warned_about():
    cfg = load_config(None, ["train.steps=300", "codistill.burn_in_steps=500"])
    assert start_warnings(cfg, 300) == [
        "codistill.burn_in_steps=500 >= the run's 300 steps: the models never distil "
        "(alpha is 0 throughout)"
    ]
    assert start_warnings(cfg, 501) == []
    # weights mode distils from burn_in + refresh_delay (every=10: 10 + 5)
    cfg = load_config(None, ["train.steps=15", "codistill.mode=weights", "codistill.every=10"])
    (line,) = start_warnings(cfg, 15)
    assert line.startswith("codistill.burn_in_steps=10 + codistill.refresh_delay=5 >= the run's 15")
    assert start_warnings(cfg, 16) == []
    for off in (["codistill.n_models=1"], ["codistill.alpha=0"]):
        assert (
            start_warnings(
                load_config(None, ["train.steps=5", "codistill.burn_in_steps=9", *off]), 5
            )
            == []
        )


def test_backend_without_horovod_is_one_line_naming_the_fix(monkeypatch):
    """train.backend=horovod where Horovod cannot be imported: a ConfigError (one line, exit 2)
    that names the fix, before any collective."""
    import builtins

    from hvcodistill.comm.dataplane import make_data_plane

    real_import = builtins.__import__

    def no_horovod(name, *args, **kwargs):
        if name.startswith("horovod"):
            raise ImportError("No module named 'horovod'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_horovod)
    with pytest.raises(ConfigError) as e:
        make_data_plane("horovod", comms=None, device_type="cpu")
    assert "train.backend=horovod" in str(e.value) and "train.backend=torch" in str(e.value)
