"""The loop a user would write: plain data parallelism, the yardstick for M = 1.

    python -m hvcodistill.launch -np 4 \\
        python -m hvcodistill.reference --config configs/digits_allreduce.yaml
    python -m hvcodistill.reference --config FILE [dotted.key=value ...]     (under any launcher)

With train.backend=horovod (the default), Horovod on COMM_WORLD (init, DistributedOptimizer,
broadcast_parameters, through comm/dataplane.py's thin wrapper); with train.backend=torch, torch's
DistributedDataParallel over every rank (comm/dataplane.py's plain_ddp). And the config's model,
data, batch, optimiser and LR/weight-decay schedules, built by the same builders as training
(training/build.py), so it trains what `hvcodistill.train` trains with codistill.n_models=1.
Nothing else: no codistillation, no checkpoints, no logging, no evaluation,
no preemption handling. Its loop is timed as the trainer's is (first batch requested to last update
done), and world rank 0 writes run.dir/summary.json: {"steps", "topology", "timing": {"loop_s",
"step_s", "cpu_s", "cpu_step_s"}} (mean per rank; cpu: the process's CPU time over the loop).
`hvcodistill.train` with codistill.n_models=1 should cost the same per step
(docs/across-nodes.md, `make bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hvcodistill.comm.topology import split_communicators
from hvcodistill.config import load_config
from hvcodistill.data import make_loader
from hvcodistill.errors import ConfigError
from hvcodistill.training.build import (
    build_data,
    build_model_for,
    build_optimizer,
    build_plan,
    schedules,
    total_steps,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hvcodistill.reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML experiment file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, "codistill.n_models=1"])
    except ConfigError as e:
        print(f"hvcodistill.reference: error: {e}", file=sys.stderr, flush=True)
        return 2
    # Imported here: they start MPI when imported, and DataLoader workers (forkserver) import
    # this module again, where MPI must not start.
    from mpi4py import MPI

    from hvcodistill.comm.dataplane import HorovodDataPlane, plain_ddp, plain_ddp_close

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    comms = split_communicators(world, 1)  # one group of every rank
    use_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", comms.local.Get_rank()) if use_gpu else torch.device("cpu")
    ddp = cfg.train.backend == "torch"
    # plain Horovod on every rank (init, DistributedOptimizer, broadcast_parameters), or DDP
    plane = None if ddp else HorovodDataPlane(comms, device.type)
    topo = comms.topology
    data = build_data(cfg)
    plan = build_plan(cfg, topo, rank, len(data.train))
    total = total_steps(cfg, plan)
    model = build_model_for(cfg, data).to(device)
    lr, wd = schedules(cfg, topo, plan)
    if ddp:
        forward = plain_ddp(model, world, device)  # broadcasts rank 0's parameters
        opt = build_optimizer(cfg.optim, model, lr.base_lr)
    else:
        forward = model
        opt = plane.wrap_optimizer(build_optimizer(cfg.optim, model, lr.base_lr), model)
        plane.broadcast_initial(model)
    loader = make_loader(data.train, plan.keys(0, total), workers=cfg.data.workers, device=device)

    start, cpu_start = time.perf_counter(), time.process_time()
    for step, (x, y) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = lr(step), wd(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()  # DDP: the averaged gradients are in
        opt.step()  # DistributedOptimizer: waits for the averaged gradients, then steps
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loop_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    loop_s = world.allreduce(loop_s) / size  # COMM_WORLD: the means over ranks
    cpu_s = world.allreduce(cpu_s) / size
    if rank == 0:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "program": "hvcodistill.reference",
            "steps": total,
            "topology": {"world_size": size, "n_models": 1, "group_size": size},
            "timing": {
                "loop_s": loop_s,
                "step_s": loop_s / total,
                "cpu_s": cpu_s,
                "cpu_step_s": cpu_s / total,
            },
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"hvcodistill.reference: {total} steps, {loop_s / total * 1e3:.3f} ms/step; "
            f"summary {run_dir / 'summary.json'}",
            flush=True,
        )
    if ddp:
        plain_ddp_close()
    else:
        plane.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
