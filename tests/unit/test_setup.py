"""The set-up every rank runs alone (training/setup.py), without ranks: which environment asks
for GPUs, and the GPU rule: a job that asked for GPUs does not quietly train on CPU, unless
train.device=cpu says so."""

import pytest
import torch
import torch.nn.functional as F

from hvcodistill.config import MAX_SEED, load_config
from hvcodistill.errors import ConfigError
from hvcodistill.training.setup import check_environment, gpu_request, prepare
from tests.helpers import ROOT

DIGITS = str(ROOT / "configs" / "digits_allreduce.yaml")
QUICK = ["train.epochs=0", "train.steps=2"]


@pytest.mark.parametrize(
    "env,asked",
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
        ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),
        ({"SLURM_STEP_GPUS": "2"}, "SLURM_STEP_GPUS=2"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "SLURM_GPUS_PER_NODE=a100:4"),
        ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
        ({"GPU_DEVICE_ORDINAL": "1"}, "GPU_DEVICE_ORDINAL=1"),
    ],
)
def test_gpu_request_from_the_environment(env, asked):
    assert gpu_request(env) == asked


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="torch sees a GPU here: the rule does not apply"
)
def test_gpu_asked_but_none_seen_is_refused_unless_train_device_is_cpu(monkeypatch):
    """Through the launcher: tests/integration/test_bad_input.py. Here the rule itself, and the
    set-up that train.device=cpu lets go ahead, with the largest seed as well."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ConfigError) as e:
        check_environment(load_config(DIGITS, QUICK))
    msg = str(e.value)
    assert "CUDA_VISIBLE_DEVICES=0" in msg and "train.device=cpu" in msg and "\n" not in msg
    cfg = load_config(
        DIGITS,
        [*QUICK, "train.device=cpu", f"train.seed={MAX_SEED}", "codistill.n_models=2"],
    )
    with torch.random.fork_rng():  # prepare seeds torch's global generator
        p = prepare(cfg, 2, 1)  # rank 1 holds model 1: its init seed is MAX_SEED + 1
        for step in range(p.total_steps):
            x, y = p.data.train[p.plan.key(step)]
            loss = F.cross_entropy(p.model(x), y)
            loss.backward()
            assert torch.isfinite(loss) and len(y) == cfg.train.batch_size
