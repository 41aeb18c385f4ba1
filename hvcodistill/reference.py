"""The loop a user would write: plain Horovod data parallelism, the yardstick for M = 1.

    python -m hvcodistill.launch -np 4 python -m hvcodistill.reference --config configs/digits_allreduce.yaml
    python -m hvcodistill.reference --config FILE [dotted.key=value ...]     (under any launcher)

hvd.init() on COMM_WORLD, DistributedOptimizer, broadcast_parameters, and the config's model, data,
batch, optimiser and LR/weight-decay schedules, built by the package's own functions (build_model,
build_datasets, BatchPlan, build_schedules), so it trains what `hvcodistill.train` trains with
codistill.n_models=1. Nothing else: no codistillation, no checkpoints, no logging, no evaluation,
no preemption handling. Its loop is timed as the trainer's is (first batch requested to last update
done), and world rank 0 writes run.dir/summary.json: {"steps", "topology", "timing": {"loop_s",
"step_s"}} (mean per rank). `hvcodistill.train` with codistill.n_models=1 should cost the same per
step (README, "Measuring the cost").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hvcodistill.config import load_config
from hvcodistill.data import BatchPlan, build_datasets, make_loader
from hvcodistill.errors import ConfigError
from hvcodistill.models import build_model
from hvcodistill.training.schedules import build_schedules


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvcodistill.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML experiment file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"hvcodistill.reference: error: {e}", file=sys.stderr, flush=True)
        return 2
    import horovod.torch as hvd

    hvd.init()
    d, t, o = cfg.data, cfg.train, cfg.optim
    device = torch.device("cuda", hvd.local_rank()) if t.device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")
    data = build_datasets(d.name, path=d.path, seed=t.seed, augment=d.augment,
                          synthetic={"shape": d.synthetic_shape, "num_classes": d.synthetic_classes,
                                     "train_size": d.synthetic_train_size, "val_size": d.synthetic_val_size})
    plan = BatchPlan(n_samples=len(data.train), batch_size=t.batch_size, group_size=hvd.size(),
                     group_rank=hvd.rank(), n_models=1, model_id=0, order="shared", seed=t.seed)
    total = t.steps or max(1, int(round(t.epochs * plan.steps_per_epoch)))
    torch.manual_seed(t.seed if cfg.model.init_seed is None else cfg.model.init_seed)
    model = build_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes,
                        hidden=cfg.model.hidden).to(device)
    lr, wd = build_schedules(o, per_model_batch=t.batch_size * hvd.size(), steps_per_epoch=plan.steps_per_epoch,
                             total_steps=total)
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr.base_lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr.base_lr, weight_decay=o.weight_decay)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loader = make_loader(data.train, plan.keys(0, total), workers=d.workers, device=device)

    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = lr(step), wd(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loop_s = time.perf_counter() - start

    loop_s = hvd.allreduce(torch.tensor([loop_s], dtype=torch.float64), op=hvd.Average, name="loop_s").item()
    if hvd.rank() == 0:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"program": "hvcodistill.reference", "steps": total,
                   "topology": {"world_size": hvd.size(), "n_models": 1, "group_size": hvd.size()},
                   "timing": {"loop_s": loop_s, "step_s": loop_s / total}}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"hvcodistill.reference: {total} steps, {loop_s / total * 1e3:.3f} ms/step; "
              f"summary {run_dir / 'summary.json'}", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
