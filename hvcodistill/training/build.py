"""Builders shared by training and the plain reference loop: data, model, optimizer, schedules,
batch plan and step count, all from one config."""

from __future__ import annotations

import torch

from hvcodistill.comm.topology import Topology
from hvcodistill.data import BatchPlan, DataSpec, build_datasets
from hvcodistill.models import build_model
from hvcodistill.optim import OPTIMIZERS, LRSchedule, WDSchedule, build_schedules


def build_data(cfg) -> DataSpec:
    """Train and validation sets of `data.*` (synthetic sizes, token windows of model.context)."""
    d = cfg.data
    synthetic = {
        "shape": d.synthetic_shape,
        "num_classes": d.synthetic_classes,
        "train_size": d.synthetic_train_size,
        "val_size": d.synthetic_val_size,
    }
    return build_datasets(
        d.name,
        path=d.path,
        seed=cfg.train.seed,
        augment=d.augment,
        synthetic=synthetic,
        context=cfg.model.context,
    )


def build_model_for(cfg, data: DataSpec, model_id: int = 0) -> torch.nn.Module:
    """Model `model_id`'s initial weights: models start from different seeds, so they differ;
    the ranks of one group build identical ones."""
    m = cfg.model
    torch.manual_seed((cfg.train.seed if m.init_seed is None else m.init_seed) + model_id)
    return build_model(
        m.name,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        hidden=m.hidden,
        dropout=m.dropout,
        layers=m.layers,
        heads=m.heads,
        width=m.width,
    )


def build_optimizer(o, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[o.name](model.parameters(), o, lr)


def build_plan(cfg, topo: Topology, world_rank: int, n_samples: int) -> BatchPlan:
    """Which samples this rank takes at every step (data/sharding.py)."""
    return BatchPlan(
        n_samples=n_samples,
        batch_size=cfg.train.batch_size,
        group_size=topo.group_size,
        group_rank=topo.group_rank(world_rank),
        n_models=topo.n_models,
        model_id=topo.model_id(world_rank),
        order=cfg.data.order,
        seed=cfg.train.seed,
    )


def total_steps(cfg, plan: BatchPlan) -> int:
    t = cfg.train
    return t.steps or max(1, int(round(t.epochs * plan.steps_per_epoch)))


def schedules(cfg, topo: Topology, plan: BatchPlan) -> tuple[LRSchedule, WDSchedule]:
    """Learning rate and weight decay by step, for a model's batch of G x train.batch_size."""
    return build_schedules(
        cfg.optim,
        per_model_batch=cfg.train.batch_size * topo.group_size,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=total_steps(cfg, plan),
    )
