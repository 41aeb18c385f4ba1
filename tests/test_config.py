from pathlib import Path

import pytest

from hvcodistill.config import Config, load_config
from hvcodistill.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
    cfg = load_config(None, ["train.steps=5", "codistill.every=10", "model.hidden=[64,32]",
                             "optim.lr=null", "data.augment=true", "optim.lr_gamma=0.5"])
    assert cfg.codistill.every == 10 and type(cfg.codistill.every) is int
    assert cfg.model.hidden == [64, 32]
    assert cfg.optim.lr is None and cfg.data.augment is True and cfg.optim.lr_gamma == 0.5
    assert load_config(None, ["train.steps=5", "optim.lr=0.3"]).optim.lr == 0.3


def test_exponent_numbers_are_numbers(tmp_path):
    assert load_config(None, ["train.steps=5", "optim.weight_decay=1e-5"]).optim.weight_decay == 1e-5
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


@pytest.mark.parametrize("item,key", [("codistill.every=abc", "codistill.every"),
                                      ("train.batch_size=1.5", "train.batch_size"),
                                      ("data.augment=1", "data.augment"),
                                      ("model.hidden=64", "model.hidden")])
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
    assert load_config(None, base[:1] + ["codistill.mode=weights", "data.order=disjoint"]).codistill.mode == "weights"


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
