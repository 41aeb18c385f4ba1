"""The shipped configs: the ImageNet ones encode the paper's recipe (Sodhani et al. 2021,
Table/Sec. 4) and ask for CUDA; the GPT-2 small one is GPT-2 small."""

from pathlib import Path

import pytest
import torch

from hvcodistill.comm.topology import Topology
from hvcodistill.config import load_config
from hvcodistill.models import build_model
from hvcodistill.optim import build_schedules

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGENET_TRAIN = 1_281_167


def schedules(name, world_size=16):
    cfg = load_config(str(CONFIGS / name))
    topo = Topology(world_size, cfg.codistill.n_models)
    batch = cfg.train.batch_size * topo.group_size
    spe = IMAGENET_TRAIN // batch
    total = round(cfg.train.epochs * spe)
    lr, wd = build_schedules(
        cfg.optim, per_model_batch=batch, steps_per_epoch=spe, total_steps=total
    )
    return cfg, batch, spe, total, lr, wd


def test_same_updates_half_the_epochs():
    _, b1, _, t1, _, _ = schedules("imagenet_resnet50_allreduce.yaml")
    cfg2, b2, _, t2, _, _ = schedules("imagenet_resnet50_codistill.yaml")
    assert (b1, b2) == (512, 256) and t1 == t2 == 225_180
    assert (
        cfg2.codistill.mode == "weights"
        and cfg2.codistill.every == 2500
        and cfg2.codistill.n_models == 2
    )


def test_allreduce_recipe():
    _, _, spe, total, lr, wd = schedules("imagenet_resnet50_allreduce.yaml")
    assert lr(5 * spe) == pytest.approx(0.2) and lr(5 * spe // 2) == pytest.approx(0.1, rel=1e-3)
    assert lr(30 * spe - 1) == pytest.approx(0.2) and lr(30 * spe) == pytest.approx(0.02)
    assert lr(80 * spe) == pytest.approx(0.0002) and wd(total - 1) == 1e-4


def test_codistill_recipe_decays_weight_decay():
    _, _, spe, total, lr, wd = schedules("imagenet_resnet50_codistill.yaml")
    assert lr(round(2.5 * spe)) == pytest.approx(0.1)
    assert [lr(e * spe) for e in (18, 38, 44)] == pytest.approx([0.01, 0.001, 0.0001])
    assert [wd(e * spe - 1) for e in (18, 38)] == [1e-4, 1e-5]
    assert wd(18 * spe) == 1e-5 and wd(38 * spe) == 0.0


def test_predictions_variant_shares_the_schedule():
    a = load_config(str(CONFIGS / "imagenet_resnet50_codistill.yaml"))
    b = load_config(str(CONFIGS / "imagenet_resnet50_codistill_predictions.yaml"))
    assert b.codistill.mode == "predictions" and b.data.order == "shared"
    assert a.optim == b.optim and a.train == b.train


def test_gpt2_small_recipe_is_gpt2_small():
    """configs/lm_gpt2_small_codistill.yaml builds GPT-2 small (124 M parameters with the
    50257-token vocabulary, tied embeddings), in bf16, weights mode with a burn-in, for 16 GPUs."""
    cfg = load_config(str(CONFIGS / "lm_gpt2_small_codistill.yaml"))
    with torch.device("meta"):
        model = build_model(
            cfg.model.name,
            input_shape=(cfg.model.context,),
            num_classes=50257,
            layers=cfg.model.layers,
            heads=cfg.model.heads,
            width=cfg.model.width,
        )
    n = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < n < 125_000_000, n
    assert (
        cfg.train.amp == "bf16"
        and cfg.codistill.mode == "weights"
        and cfg.codistill.burn_in_steps > 0
    )
    assert cfg.train.device == "cuda" and cfg.data.name == "tokens"


def test_imagenet_configs_ask_for_cuda():
    for path in sorted(CONFIGS.glob("imagenet*.yaml")):
        assert load_config(str(path)).train.device == "cuda", path.name
