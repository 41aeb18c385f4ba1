"""Checkpoints (training/checkpoint.py) without MPI: which one is usable, what resume compares,
what a prune leaves."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from hvcodistill.comm.topology import Topology
from hvcodistill.config import load_config
from hvcodistill.errors import ConfigError
from hvcodistill.training import checkpoint
from hvcodistill.training.setup import resume_settings
from tests.helpers import ROOT

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")  # lr_schedule: cosine
TOPO = Topology(2, 2)
DATA = SimpleNamespace(train=range(1437), input_shape=(64,), num_classes=10)


def cfg_with(*overrides):
    return load_config(CONFIG, list(overrides))


def make_ckpt(
    run_dir, model_id, step, cfg=None, total=100, data=DATA, topo=TOPO, payload=b"x" * 64
):
    """A checkpoint as checkpoint._write leaves it: the file, then its sidecar."""
    cfg = cfg or cfg_with()
    directory = checkpoint.model_dir(run_dir, model_id)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"step_{step:09d}.pt").write_bytes(payload)
    meta = {
        "step": step,
        "model_id": model_id,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "topology": topo.as_dict(),
        "settings": resume_settings(cfg, data, total),
    }
    (directory / f"step_{step:09d}.json").write_text(json.dumps(meta))


def run_of(tmp_path, steps=(10, 20), models=(0, 1), **kw):
    for m in models:
        for s in steps:
            make_ckpt(tmp_path, m, s, **kw)
    return tmp_path


# ---------------------------------------------------------------- what is usable, what is refused
def test_scan_complete_steps_newest_first(tmp_path):
    assert checkpoint.scan(run_of(tmp_path), TOPO, resume_settings(cfg_with(), DATA, 100)) == [
        (20, None),
        (10, None),
    ]


def test_truncated_newest_and_garbage_sidecar_are_skipped_with_a_reason(tmp_path):
    run_of(tmp_path, steps=(10, 20, 30))
    pt = checkpoint.step_path(tmp_path, 0, 30, ".pt")
    pt.write_bytes(pt.read_bytes()[:10])
    checkpoint.step_path(tmp_path, 1, 20, ".json").write_bytes(b"\xff\x00 not json")
    found = dict(checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(), DATA, 100)))
    assert found[10] is None
    assert "truncated (10 of 64 bytes)" in found[30] and str(pt) in found[30]
    assert "unreadable or not a checkpoint sidecar" in found[20]


def test_a_file_without_sidecar_is_an_interrupted_write(tmp_path):
    run_of(tmp_path)
    checkpoint.step_path(tmp_path, 1, 30, ".pt").write_bytes(b"half")
    found = checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(), DATA, 100))
    assert (
        found[0][0] == 30
        and "step_000000030.pt has no sidecar (its write was interrupted)" in found[0][1]
    )
    assert "model 0 has no file of it" in found[0][1]
    assert found[1] == (20, None)


def test_one_model_deleted_is_an_error_not_a_fresh_start(tmp_path):
    run_of(tmp_path, models=(0,))
    with pytest.raises(ConfigError) as e:
        checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(), DATA, 100))
    msg = str(e.value)
    assert (
        "model 1 has none" in msg and "restore" in msg and "new run.dir" in msg and "\n" not in msg
    )


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    run_of(tmp_path, steps=(10,))
    pt = checkpoint.step_path(tmp_path, 1, 10, ".pt")
    pt.write_bytes(b"")
    with pytest.raises(ConfigError, match="model 1 has no complete one.*truncated"):
        checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(), DATA, 100))


def test_empty_run_dir_is_a_fresh_start(tmp_path):
    assert checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(), DATA, 100)) == []


def test_refusal_names_the_newest_checkpoint(tmp_path):
    old = cfg_with("train.seed=1")
    for s in (10, 20, 30, 40, 50, 60):
        for m in (0, 1):
            make_ckpt(tmp_path, m, s, cfg=old)
    with pytest.raises(ConfigError) as e:
        checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with("train.seed=2"), DATA, 100))
    assert "step_000000060.json" in str(e.value) and "train.seed=1" in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "data.augment=true",
        "optim.lr=0.1",
        "optim.warmup=2",
        "optim.lr_schedule=step",
        "optim.lr_gamma=0.5",
        "optim.lr_milestones=[5]",
        "optim.wd_milestones=[5]",
        "optim.momentum=0.5",
        "optim.weight_decay=0.001",
        "optim.unit=steps",
        "codistill.payload_dtype=bf16",
        "model.dropout=0.5",
    ],
)
def test_every_key_that_changes_the_trajectory_is_compared(tmp_path, override):
    run_of(tmp_path)
    extra = ["optim.wd_values=[0.0]"] if override.startswith("optim.wd_milestones") else []
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(override, *extra), DATA, 100))


def test_step_count_matters_only_for_the_cosine_schedule(tmp_path):
    run_of(tmp_path)  # cosine over 100 steps
    with pytest.raises(ConfigError, match="total steps.*cosine.*=100.*=200"):
        checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(), DATA, 200))
    other = tmp_path / "step"
    run_of(other, cfg=cfg_with("optim.lr_schedule=step"))
    assert checkpoint.scan(
        other, TOPO, resume_settings(cfg_with("optim.lr_schedule=step"), DATA, 200)
    )[0] == (20, None)


@pytest.mark.parametrize(
    "override",
    [
        "train.log_every=3",
        "train.eval_every=7",
        "run.checkpoint_every=5",
        "run.keep_checkpoints=1",
        "train.progress=false",
        "data.workers=1",
        "train.device=cpu",
        "run.preempt_check_every=4",
    ],
)
def test_logging_evaluation_and_cadence_may_change(tmp_path, override):
    run_of(tmp_path)
    assert checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with(override), DATA, 100))[0] == (
        20,
        None,
    )


def test_a_sidecar_without_a_compared_key_is_refused_not_resumed(tmp_path):
    run_of(tmp_path)
    for p in tmp_path.glob("checkpoints/model_*/*.json"):
        meta = json.loads(p.read_text())
        del meta["settings"]["optim.lr"]
        p.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"does not record optim\.lr .*another run\.dir"):
        checkpoint.scan(tmp_path, TOPO, resume_settings(cfg_with("optim.lr=0.3"), DATA, 100))


def test_prune_drops_interrupted_temporary_files(tmp_path):
    run_of(tmp_path, steps=(10, 20, 30), models=(0,))
    d = checkpoint.model_dir(tmp_path, 0)
    (d / ".step_000000040.pt.tmp123").write_bytes(b"partial")
    checkpoint._prune(d, keep=2)
    assert sorted(p.name for p in d.iterdir()) == [
        "step_000000020.json",
        "step_000000020.pt",
        "step_000000030.json",
        "step_000000030.pt",
    ]
