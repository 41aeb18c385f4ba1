"""Per-model checkpoints that lose nothing: atomic, verified, retained, resumed exactly.

Layout: <run.dir>/checkpoints/model_<i>/step_<s>.pt and a sidecar step_<s>.json (sha256, size,
topology, the settings that must not change). Group rank 0 of each model writes its model's file:
temporary file, fsync, rename, then the sidecar the same way, so a sidecar only ever describes a
complete file. What differs between the ranks of a group (BatchNorm statistics, RNG states,
counters) is gathered into the same file, so every rank resumes exactly. In weights mode the
teachers (the same on every rank of a group) are saved once, with a refresh still in flight:
it is finished first, and its bytes are saved so that the resumed run installs it at its step.

On resume every rank agrees on the newest step that every model wrote completely and that every
rank can read; a file whose hash does not match is skipped for the previous one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch

from hvcodistill.comm.traffic import gather_sends
from hvcodistill.errors import ConfigError

EXIT_PREEMPTED = 75     # EX_TEMPFAIL: the sbatch script turns it into `scontrol requeue`

# Settings a checkpoint must share with the run that resumes it (the rest may change: steps, logging).
RESUME_KEYS = ("codistill.n_models", "codistill.mode", "codistill.every", "codistill.alpha",
               "codistill.distance", "codistill.temperature", "codistill.burn_in_steps",
               "codistill.refresh_delay", "data.name",
               "data.order", "model.name", "model.hidden", "model.init_seed", "optim.name",
               "train.batch_size", "train.seed", "train.amp")


def settings(cfg, data) -> dict:
    """What a checkpoint must share with the run that resumes it, the data's shape included."""
    out = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in RESUME_KEYS}
    out["data (train samples, input shape, classes)"] = [len(data.train), list(data.input_shape),
                                                        data.num_classes]
    return out


def model_dir(run_dir: Path, model_id: int) -> Path:
    return run_dir / "checkpoints" / f"model_{model_id}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":                    # this rank's GPU only: others may be absent on resume
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _buffers(module: torch.nn.Module) -> dict:
    return {n: b.detach().cpu().clone() for n, b in module.named_buffers()}


def _load_buffers(module: torch.nn.Module, buffers: dict) -> None:
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(buffers[n])


def _write(tr, step: int) -> None:
    """Group rank 0 writes the model's checkpoint, with what every rank of the group holds alone."""
    teachers = getattr(tr.exchange, "teachers", [])
    if hasattr(tr.exchange, "finish"):
        # weights mode, every rank: a refresh in flight completes (its non-blocking peer_comm and
        # group_comm collectives); it is still installed at its own step, here or after a resume
        tr.exchange.finish()
    local = {"buffers": _buffers(tr.model), "rng": _rng_state(tr.device), "timer": tr.timer.state_dict(),
             "exchange": tr.exchange.state_dict()}
    c = tr.comms
    tr.traffic.add("checkpoint", gather_sends(c.group_ranks[0], c.world_rank, len(pickle.dumps(local)), c.nodes))
    local["traffic"] = tr.traffic.state_dict()
    # group_comm: the per-rank state of every rank of this model travels to group rank 0.
    ranks = tr.comms.group.gather(local, root=0)
    if tr.comms.group_rank != 0:
        return
    state = {"step": step, "model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
             "scaler": tr.scaler.state_dict(), "teachers": [t.state_dict() for t in teachers],
             "pending_refresh": getattr(tr.exchange, "pending_state", lambda: None)(), "ranks": ranks}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    directory = model_dir(tr.run_dir, tr.comms.model_id)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / f"step_{step:09d}.pt", data)
    meta = {"step": step, "model_id": tr.comms.model_id, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "topology": tr.comms.topology.as_dict(),
            "settings": settings(tr.cfg, tr.data)}
    _write_atomic(directory / f"step_{step:09d}.json", (json.dumps(meta, indent=1) + "\n").encode())


def save(tr, step: int) -> None:
    """Called by every rank at the same step: write, then prune once every model has written."""
    _write(tr, step)
    # COMM_WORLD: no model drops an older checkpoint before every model has this one, so a crash
    # mid-write always leaves a step that all models share.
    tr.comms.world.Barrier()
    if tr.comms.group_rank == 0:
        _prune(model_dir(tr.run_dir, tr.comms.model_id), keep=tr.cfg.run.keep_checkpoints)


def _prune(directory: Path, keep: int) -> None:
    """Retention: keep the newest `keep` checkpoints (sidecar removed first: never a dangling one)."""
    steps = sorted(int(p.stem.split("_")[1]) for p in directory.glob("step_*.json"))
    for s in steps[:-keep] if keep > 0 else []:
        for suffix in (".json", ".pt"):
            (directory / f"step_{s:09d}{suffix}").unlink(missing_ok=True)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
        pt = path.with_suffix(".pt")
        return meta if pt.is_file() and pt.stat().st_size == meta["bytes"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scan(run_dir: Path, cfg, topology, data) -> list[int]:
    """Steps, newest first, that every model has a complete checkpoint for; a checkpoint written
    with another topology or settings is an error naming the key (exit 2), not a silent restart."""
    per_model = []
    for m in range(topology.n_models):
        metas = {}
        for p in model_dir(run_dir, m).glob("step_*.json"):
            meta = _read_meta(p)
            if meta is None:
                continue
            if meta["topology"] != topology.as_dict():
                t = meta["topology"]
                raise ConfigError(
                    f"checkpoint {p} was written by W={t['world_size']} M={t['n_models']} G={t['group_size']}, "
                    f"this run is W={topology.world_size} M={topology.n_models} G={topology.group_size}: "
                    "resume with the same ranks or use another run.dir")
            for key, value in settings(cfg, data).items():
                if meta["settings"].get(key) != value:
                    raise ConfigError(
                        f"checkpoint {p} was written with {key}={meta['settings'].get(key)!r}, this run has "
                        f"{key}={value!r}: resume with the same setting or use another run.dir")
            metas[meta["step"]] = meta
        per_model.append(set(metas))
    common = set.intersection(*per_model) if per_model else set()
    return sorted(common, reverse=True)


def load_verified(run_dir: Path, model_id: int, step: int) -> dict | None:
    """The checkpoint's state if its bytes match the sidecar's sha256, else None."""
    base = model_dir(run_dir, model_id) / f"step_{step:09d}"
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        data = base.with_suffix(".pt").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception:  # unreadable for any reason: the caller falls back to an older step
        return None


def restore(tr) -> int:
    """Load the newest checkpoint all ranks can use; returns the step to start from (0: none)."""
    from mpi4py import MPI

    world = tr.comms.world
    # COMM_WORLD: world rank 0 reads the sidecars; everyone gets the same candidate list (or error).
    found = None
    if world.Get_rank() == 0:
        try:
            found = (scan(tr.run_dir, tr.cfg, tr.comms.topology, tr.data), None)
        except ConfigError as e:
            found = (None, str(e))
    steps, error = world.bcast(found, root=0)
    if error:
        raise ConfigError(error)
    for step in steps:
        state = load_verified(tr.run_dir, tr.comms.model_id, step)
        # COMM_WORLD: resume only from a step that every rank could read and verify.
        if world.allreduce(state is not None, op=MPI.LAND):
            _apply(tr, state)
            if world.Get_rank() == 0:
                print(f"hvcodistill: resuming from step {step} ({tr.run_dir / 'checkpoints'})",
                      file=sys.stderr, flush=True)
            return step
        if world.Get_rank() == 0:
            print(f"hvcodistill: warning: checkpoint step {step} is corrupt or unreadable on some rank; "
                  "trying the previous one", file=sys.stderr, flush=True)
    if world.Get_rank() == 0 and any((tr.run_dir / "checkpoints").glob("model_*/step_*.pt")):
        print(f"hvcodistill: warning: {tr.run_dir / 'checkpoints'} holds checkpoints but none that every "
              "model completed and every rank can read: starting from step 0", file=sys.stderr, flush=True)
    return 0


def _apply(tr, state: dict) -> None:
    mine = state["ranks"][tr.comms.group_rank]
    tr.model.load_state_dict(state["model"])
    _load_buffers(tr.model, mine["buffers"])
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scaler.load_state_dict(state["scaler"])
    for teacher, teacher_state in zip(getattr(tr.exchange, "teachers", []), state["teachers"]):
        teacher.load_state_dict(teacher_state)
    if hasattr(tr.exchange, "load_pending_state"):
        tr.exchange.load_pending_state(state.get("pending_refresh"))
    tr.timer.load_state_dict(mine["timer"])
    tr.exchange.load_state_dict(mine["exchange"])
    tr.traffic.load_state_dict(mine["traffic"])
    _set_rng_state(mine["rng"], tr.device)
