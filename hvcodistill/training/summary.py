"""The end of a run: summary.json (DESIGN.md's contract), the final weights, the done line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hvcodistill.comm.traffic import Traffic, per_step
from hvcodistill.files import write_atomic
from hvcodistill.training.metrics import write_json_atomic
from hvcodistill.training.timing import Timer


def summarize(
    comms,
    cfg,
    timer: Timer,
    exchange,
    traffic: Traffic,
    final: dict,
    *,
    steps: int,
    steps_per_epoch: int,
    resumed_from: int,
    algorithm: str,
    run_dir: Path,
) -> dict | None:
    """Gather every model's figures to world rank 0 and write summary.json there (returned
    there; None elsewhere)."""
    world, topo = comms.world, comms.topology
    # COMM_WORLD: mean time per rank and total bytes received over peer_comm.
    names = (*Timer.PARTS, "loop_s", "cpu_s")
    local = np.array(
        [
            *(getattr(timer, k) for k in names),
            float(exchange.bytes_received),
            float(exchange.count),
            *map(float, traffic.flat()),
        ]
    )
    total = np.empty_like(local)
    world.Allreduce(local, total, op=MPI.SUM)  # float64: bytes stay exact up to 2**53
    n = len(names)
    timing = dict(zip(names, (total[:n] / topo.world_size).tolist()))
    moved = Traffic.unflat(total[n + 2 :])
    mine = {
        "id": comms.model_id,
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
    }
    if "val_perplexity" in final:  # a language model: next-token figures
        mine["val_perplexity"] = final["val_perplexity"]
    # COMM_WORLD: one row per model, from its group rank 0
    models = world.gather(mine if comms.group_rank == 0 else None, root=0)
    if world.Get_rank() != 0:
        return None
    c = cfg.codistill
    summary = {
        "topology": topo.as_dict(),
        "mode": c.mode if topo.n_models > 1 else "allreduce",
        "every": c.every,
        "alpha": c.alpha,
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "wall_seconds": timer.wall_seconds(),  # all segments of a resumed run
        "segment_seconds": timer.segment_seconds(),
        "resumed_from_step": resumed_from,
        "models": sorted((m for m in models if m), key=lambda m: m["id"]),
        "ensemble_val_accuracy": final["ensemble_val_accuracy"],
        "disagreement": final["disagreement"],
        # a language model: the ensemble's next-token loss and perplexity
        **{k: final[k] for k in ("ensemble_val_loss", "ensemble_val_perplexity") if k in final},
        # mean per rank; the parts add up to loop_s
        "timing": {
            **timing,
            "step_s": timing["loop_s"] / max(1, steps),
            "cpu_step_s": timing["cpu_s"] / max(1, steps),
        },
        "exchanged_bytes": int(total[n]),
        "exchanges": int(total[n + 1] / topo.world_size),
        # where the bytes went: all ranks' sends, per step and in all, by collective and link
        "nodes": comms.nodes.as_dict(),
        "bytes_per_step": per_step(moved, steps),
        "bytes": moved,
        "bytes_model": {
            "allreduce": algorithm,
            "exchange": "counted",
            "evaluation": "counted",
            "checkpoint": "counted",
        },
    }
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def save_final_model(model: torch.nn.Module, comms, run_dir: Path) -> None:
    """Group rank 0 writes its model's final weights to model_<id>.pt (the atomic-write rule)."""
    if comms.group_rank != 0:
        return
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    write_atomic(run_dir / f"model_{comms.model_id}.pt", buf.getvalue())


def done_line(summary: dict, run_dir: Path) -> str:
    """What world rank 0 prints at the end: the figures that matter, and where the rest is."""
    models = summary["models"]
    if "ensemble_val_perplexity" in summary:  # a language model: next-token figures
        perplexities = ", ".join(f"{m['val_perplexity']:.2f}" for m in models)
        figures = (
            "val loss "
            + ", ".join(f"model {m['id']} {m['val_loss']:.4f}" for m in models)
            + f" (perplexity {perplexities}); "
            f"ensemble perplexity {summary['ensemble_val_perplexity']:.2f}"
        )
    else:
        figures = (
            "val accuracy "
            + ", ".join(f"model {m['id']} {m['val_accuracy']:.4f}" for m in models)
            + f"; ensemble {summary['ensemble_val_accuracy']:.4f}"
        )
    return (
        f"hvcodistill: done in {summary['wall_seconds']:.1f}s, {summary['steps']} steps; "
        f"{figures}; disagreement {summary['disagreement']:.4f}; "
        f"summary {run_dir / 'summary.json'}"
    )
