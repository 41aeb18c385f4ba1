"""The trainer under real mpirun, run as users run it: the CLI, its run directory and exit codes."""

import json

import pytest
import torch

from tests.helpers import MPI_DIR, ROOT, run_ranks, torch_backend
from tests.mpi.checks import ident, result

pytestmark = pytest.mark.mpi

CODISTILL = str(ROOT / "configs" / "digits_codistill.yaml")
ALLREDUCE = str(ROOT / "configs" / "digits_allreduce.yaml")
SHORT = ["train.epochs=0", "train.steps=30", "train.eval_every=0", "train.progress=false"]


def train(ranks, np, run_dir, *overrides, config=CODISTILL, check=True):
    return ranks(
        np,
        ["-m", "hvcodistill.train", "--config", config, *SHORT, f"run.dir={run_dir}", *overrides],
        check=check,
    )


def load(path):
    return torch.load(path, map_location="cpu")


def assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], **tol), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


# every data plane (train.backend) on 4 ranks, in the same job as the other 4-rank cases
INVARIANTS = [(np, f"invariants:{mode}") for np in (4, 6) for mode in ("predictions", "weights")]
INVARIANTS += [
    pytest.param(check, marks=torch_backend, id=ident(check))
    for check in ((4, f"invariants:{mode}/torch") for mode in ("predictions", "weights"))
]


@pytest.mark.parametrize("check", INVARIANTS, ids=ident)
def test_group_invariants_every_step(request, check):
    np, mode = check[0], check[1].split(":")[1].split("/")[0]
    assert result(request, check).startswith(
        f"invariants ok: {mode}, W={np} M={np // 2}, 12 steps, "
    )


EXCHANGE_LINES = {
    "predictions": "predictions ok",
    "mismatch": "mismatch caught (value, label)",
    "weights": "weights ok",
}


# the exchanges travel on the data plane's wire (mpi4py with Horovod, process groups with torch):
# every case on each, the torch ones in the 4-rank job
EXCHANGES = [(np, f"exchange:{what}") for np in (4, 6) for what in EXCHANGE_LINES]
EXCHANGES += [
    pytest.param(check, marks=torch_backend, id=ident(check))
    for check in ((4, f"exchange:{what}/torch") for what in EXCHANGE_LINES)
]


@pytest.mark.parametrize("check", EXCHANGES, ids=ident)
def test_exchange(request, check):
    np, what = check[0], check[1].split(":")[1].split("/")[0]
    assert result(request, check) == f"{EXCHANGE_LINES[what]}: W={np} M={np // 2}"


@pytest.mark.parametrize(
    "backend,plain",
    [("horovod", "plain_horovod.py"), pytest.param("torch", "plain_ddp.py", marks=torch_backend)],
)
def test_one_model_equals_a_plain_loop_of_its_backend(ranks, tmp_path, backend, plain):
    """M = 1 on each data plane equals the plain data-parallel loop a user would write with it:
    Horovod's DistributedOptimizer, or torch's DistributedDataParallel."""
    train(
        ranks,
        2,
        tmp_path / "m1",
        "optim.lr=0.1",
        "optim.lr_schedule=constant",
        "optim.warmup=0",
        f"train.backend={backend}",
        config=ALLREDUCE,
    )
    ranks(2, [str(MPI_DIR / plain), str(tmp_path / "plain.pt"), "30", "32", "0.1", "0"])
    assert_close(
        load(tmp_path / "m1" / "model_0.pt"), load(tmp_path / "plain.pt"), rtol=1e-5, atol=1e-6
    )


@pytest.fixture(scope="module")
def one_model(tmp_path_factory):
    """The M = 1 run of digits_codistill.yaml on 2 ranks (the short schedule), read by the two
    tests below: its model_0.pt is what a group of an M = 2 run equals without codistillation."""
    run_dir = tmp_path_factory.mktemp("one_model") / "a"
    train(run_ranks, 2, run_dir, "codistill.n_models=1")
    return load(run_dir / "model_0.pt")


def test_alpha_zero_groups_are_independent_runs(ranks, tmp_path, one_model):
    train(ranks, 4, tmp_path / "m2", "codistill.alpha=0")
    train(ranks, 2, tmp_path / "b", "codistill.n_models=1", "model.init_seed=1")
    m0, m1 = load(tmp_path / "m2" / "model_0.pt"), load(tmp_path / "m2" / "model_1.pt")
    assert_close(m0, one_model, rtol=1e-5, atol=1e-6)
    assert_close(m1, load(tmp_path / "b" / "model_0.pt"), rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(m0[k], m1[k]) for k in m0), "the two models should differ"


def test_codistillation_changes_the_models(ranks, tmp_path, one_model):
    """The control for the test above: with alpha > 0 the groups are no longer independent."""
    train(ranks, 4, tmp_path / "m2", "codistill.alpha=1", "codistill.burn_in_steps=0")
    a = load(tmp_path / "m2" / "model_0.pt")
    assert any(not torch.allclose(a[k], one_model[k], rtol=1e-5, atol=1e-6) for k in a)


CONTRACT_KEYS = {
    "topology",
    "mode",
    "every",
    "steps",
    "wall_seconds",
    "models",
    "ensemble_val_accuracy",
    "disagreement",
    "timing",
    "exchanged_bytes",
}


@pytest.mark.parametrize("mode", ["predictions", "weights"])
def test_digits_end_to_end(ranks, tmp_path, mode):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    extra = ["codistill.every=20", "data.order=disjoint"] if mode == "weights" else []
    proc = ranks(
        4,
        [
            "-m",
            "hvcodistill.train",
            "--config",
            CODISTILL,
            f"run.dir={run}",
            f"codistill.mode={mode}",
            "train.epochs=12",
            *extra,
        ],
    )
    assert "hvcodistill: done" in proc.stdout
    s = json.loads((run / "summary.json").read_text())
    assert CONTRACT_KEYS <= s.keys()
    assert s["topology"] == {"world_size": 4, "n_models": 2, "group_size": 2}
    assert s["mode"] == mode and set(s["timing"]) >= {"compute_s", "allreduce_s", "exchange_s"}
    assert [m["id"] for m in s["models"]] == [0, 1]
    for m in s["models"]:
        assert m["val_accuracy"] >= 0.90, s["models"]
    assert s["ensemble_val_accuracy"] >= 0.90 and 0 <= s["disagreement"] < 0.1
    assert s["exchanged_bytes"] > 0 and s["timing"]["exchange_s"] > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {0, 1} and {r["kind"] for r in rows} == {"train", "val"}
    assert (run / "config.yaml").is_file()
    for model in (0, 1):
        acc = EventAccumulator(str(run / "tb" / f"model_{model}"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {
            "train/task_loss",
            "train/distill_loss",
            "train/accuracy",
            "train/lr",
            "train/weight_decay",
            "train/exchange_s",
            "val/val_accuracy",
            "val/ensemble_val_accuracy",
        } <= tags, tags
        last = acc.Scalars("val/val_accuracy")[-1]
        assert last.step == s["steps"] and last.value == pytest.approx(
            s["models"][model]["val_accuracy"]
        )
        assert any(e.value > 0 for e in acc.Scalars("train/distill_loss"))


def test_resnet50_weights_mode_bf16_smoke(ranks, tmp_path):
    """The paper's model and config on CPU: torchvision ResNet-50, weight exchange, bf16 autocast,
    a DataLoader worker; synthetic 64x64 images so it runs in seconds."""
    cfg = str(ROOT / "configs" / "imagenet_resnet50_codistill.yaml")
    proc = ranks(
        2,
        [
            "-m",
            "hvcodistill.train",
            "--config",
            cfg,
            f"run.dir={tmp_path}",
            "data.name=synthetic",
            "data.synthetic_shape=[3,64,64]",
            "data.synthetic_train_size=64",
            "data.synthetic_val_size=16",
            "train.epochs=0",
            "train.steps=3",
            "train.batch_size=4",
            "train.device=cpu",  # the config asks for cuda
            "codistill.every=2",
            "codistill.burn_in_steps=0",
            "data.workers=1",
            "train.eval_every=0",
            "train.progress=false",
        ],
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mode"] == "weights" and s["exchanges"] == 2 and s["steps"] == 3
    # each exchange moves a whole ResNet-50 (parameters and BN buffers) to each rank's one peer
    from hvcodistill.models import build_model

    state = build_model("resnet50", input_shape=(3, 64, 64), num_classes=10).state_dict().values()
    assert s["exchanged_bytes"] == 2 * 2 * sum(t.numel() * t.element_size() for t in state)
    assert "hvcodistill: done" in proc.stdout


def test_horovodrun_launch(tmp_path):
    """The launcher the README shows for clusters: horovodrun (which starts mpirun itself)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMPI_MCA_mpi_yield_when_idle="1", OMP_NUM_THREADS="1")
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    proc = subprocess.run(
        [
            horovodrun,
            "-np",
            "4",
            sys.executable,
            "-m",
            "hvcodistill.train",
            "--config",
            CODISTILL,
            *SHORT,
            f"run.dir={tmp_path}",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["topology"] == {"world_size": 4, "n_models": 2, "group_size": 2} and s["steps"] == 30
