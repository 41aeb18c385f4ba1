"""Per-model checkpoints that lose nothing: atomic, verified, retained, resumed exactly.

Layout: <run.dir>/checkpoints/model_<i>/step_<s>.pt and a sidecar step_<s>.json (sha256, size,
topology, the settings that must not change). Group rank 0 of each model writes its model's file:
temporary file, fsync, rename, then the sidecar the same way, so a sidecar only ever describes a
complete file. What differs between the ranks of a group (BatchNorm statistics, RNG states,
counters) is gathered into the same file, so every rank resumes exactly. In weights mode the
teachers (the same on every rank of a group) are saved once, with a refresh still in flight:
it is finished first, and its bytes are saved so that the resumed run installs it at its step.

On resume, before anything is written to run.dir, every rank agrees on the newest step that every
model wrote completely and that every rank can read; a file that is truncated, whose sidecar is
garbage or whose hash does not match is skipped for the previous one, with a warning. Checkpoints
present but none usable, or written with other settings, stop the run (exit 2): starting from
step 0 beside them would prune them away one by one. A checkpoint that cannot be written (disk
full, unwritable) stops every rank with one line and exit 74; the previous one stays usable.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from hvcodistill.comm.traffic import gather_sends
from hvcodistill.errors import ConfigError
from hvcodistill.files import write_atomic

EXIT_PREEMPTED = 75     # EX_TEMPFAIL: the sbatch script turns it into `scontrol requeue`
EXIT_IO_ERROR = 74      # EX_IOERR: a checkpoint could not be written (disk full, unwritable)
EXIT_DATA_MISMATCH = 3  # ranks hold different data (start-up fingerprint, or an exchange's batch checksum)
EXIT_NON_FINITE = 4     # a loss or gradient became NaN/Inf: every rank stopped at one step, nothing saved

# Settings a checkpoint must share with the run that resumes it: every key that changes the
# trajectory. The rest may change: logging, evaluation, checkpoint cadence and retention, progress,
# data.workers, data.path (the data's size and shape are compared, below), train.device, and the step count
# (train.steps/epochs) unless optim.lr_schedule=cosine, whose curve depends on it.
RESUME_KEYS = ("codistill.n_models", "codistill.mode", "codistill.every", "codistill.alpha",
               "codistill.distance", "codistill.temperature", "codistill.burn_in_steps",
               "codistill.refresh_delay", "codistill.payload_dtype", "codistill.topk", "data.name", "data.order",
               "data.augment", "model.name", "model.hidden", "model.dropout", "model.init_seed",
               "model.layers", "model.heads", "model.width", "model.context",
               "optim.name", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay",
               "optim.unit", "optim.lr_schedule", "optim.warmup", "optim.lr_milestones", "optim.lr_gamma",
               "optim.wd_milestones", "optim.wd_values", "train.batch_size", "train.seed", "train.amp")
TOTAL_STEPS_KEY = "train.steps/epochs (total steps; optim.lr_schedule=cosine depends on it)"


def settings(cfg, data, total_steps: int) -> dict:
    """What a checkpoint must share with the run that resumes it, the data's shape included."""
    out = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in RESUME_KEYS}
    out["data (train samples, input shape, classes)"] = [len(data.train), list(data.input_shape),
                                                        data.num_classes]
    out[TOTAL_STEPS_KEY] = total_steps if cfg.optim.lr_schedule == "cosine" else None
    return out


def model_dir(run_dir: Path, model_id: int) -> Path:
    return run_dir / "checkpoints" / f"model_{model_id}"


def step_path(run_dir: Path, model_id: int, step: int, suffix: str) -> Path:
    return model_dir(run_dir, model_id) / f"step_{step:09d}{suffix}"


_STEP_FILE = re.compile(r"step_(\d+)\.(pt|json)")


def _step_files(directory: Path) -> dict[int, set]:
    """{step: {".pt", ".json"}} of the checkpoint files in a model's directory."""
    out: dict[int, set] = {}
    if directory.is_dir():
        for p in directory.iterdir():
            match = _STEP_FILE.fullmatch(p.name)
            if match:
                out.setdefault(int(match[1]), set()).add("." + match[2])
    return out


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


def _write(tr, step: int) -> str | None:
    """Group rank 0 writes the model's checkpoint, with what every rank of the group holds alone.
    Returns why it could not be written (disk full, unwritable), having removed what it began."""
    # every rank: in weights mode a refresh in flight completes here (non-blocking peer_comm and
    # group_comm collectives); it is still installed at its own step, here or after a resume
    exchange = tr.exchange.state_dict()
    local = {"buffers": _buffers(tr.model), "rng": _rng_state(tr.device), "timer": tr.timer.state_dict(),
             "exchange": exchange}
    c = tr.comms
    tr.traffic.add("checkpoint", gather_sends(c.group_ranks[0], c.world_rank, len(pickle.dumps(local)), c.nodes))
    local["traffic"] = tr.traffic.state_dict()
    # group_comm: the per-rank state of every rank of this model travels to group rank 0.
    ranks = tr.comms.group.gather(local, root=0)
    if tr.comms.group_rank != 0:
        return None
    state = {"step": step, "model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
             "scaler": tr.scaler.state_dict(), "exchange": tr.exchange.group_state_dict(), "ranks": ranks}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {"step": step, "model_id": tr.comms.model_id, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "topology": tr.comms.topology.as_dict(),
            "settings": settings(tr.cfg, tr.data, tr.total_steps)}
    pt, sidecar = (step_path(tr.run_dir, tr.comms.model_id, step, suffix) for suffix in (".pt", ".json"))
    path = pt.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        path = pt
        write_atomic(pt, data)
        path = sidecar
        write_atomic(sidecar, (json.dumps(meta, indent=1) + "\n").encode())
    except OSError as e:
        for done in (sidecar, pt):              # no file of this step is left to be mistaken for one
            with contextlib.suppress(OSError):
                done.unlink(missing_ok=True)
        return f"cannot write checkpoint {path}: {e.strerror or e}"
    return None


def save(tr, step: int) -> None:
    """Called by every rank at the same step: write, then prune once every model has written.

    A writer that fails (disk full, unwritable) fails alone; the allgather tells every rank, which
    then exits EXIT_IO_ERROR together, one line printed, the previous checkpoint untouched."""
    error = _write(tr, step)
    # COMM_WORLD: no model drops an older checkpoint before every model has this one, so a crash
    # mid-write always leaves a step that all models share; and every rank learns of a failed write.
    errors = [e for e in tr.comms.world.allgather(error) if e]
    if errors:
        if tr.comms.world_rank == 0:
            print(f"hvcodistill: error: {errors[0]}; the checkpoint before step {step} is kept: free space "
                  f"(or fix the permissions), then run the same command to resume from it",
                  file=sys.stderr, flush=True)
        raise SystemExit(EXIT_IO_ERROR)
    if tr.comms.group_rank == 0:
        _prune(model_dir(tr.run_dir, tr.comms.model_id), keep=tr.cfg.run.keep_checkpoints)


def _prune(directory: Path, keep: int) -> None:
    """Retention: keep the newest `keep` checkpoints (sidecar removed first: never a dangling one),
    and drop the temporary files of writes a crash interrupted."""
    steps = sorted(s for s, suffixes in _step_files(directory).items() if ".json" in suffixes)
    for s in steps[:-keep] if keep > 0 else []:
        for suffix in (".json", ".pt"):
            (directory / f"step_{s:09d}{suffix}").unlink(missing_ok=True)
    for tmp in directory.glob(".step_*.tmp*"):
        tmp.unlink(missing_ok=True)


def _read_meta(path: Path) -> tuple[dict | None, str]:
    """A sidecar whose checkpoint file is whole (its size), or None and why not."""
    try:
        meta = json.loads(path.read_text())
        size, _, _ = meta["bytes"], meta["topology"]["world_size"], meta["settings"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None, f"sidecar {path} is unreadable or not a checkpoint sidecar"
    pt = path.with_suffix(".pt")
    if not pt.is_file():
        return None, f"{pt} is missing"
    if pt.stat().st_size != size:
        return None, f"{pt} is truncated ({pt.stat().st_size} of {size} bytes)"
    return meta, ""


def _check_settings(path: Path, meta: dict, topology, expected: dict) -> None:
    """A checkpoint written with other ranks or settings is an error naming the key (exit 2)."""
    if meta["topology"] != topology.as_dict():
        t = meta["topology"]
        raise ConfigError(
            f"checkpoint {path} was written by W={t['world_size']} M={t['n_models']} G={t['group_size']}, "
            f"this run is W={topology.world_size} M={topology.n_models} G={topology.group_size}: "
            "resume with the same ranks or use another run.dir")
    for key, value in expected.items():
        # a key the sidecar lacks was not compared when it was written (an older version): not refused
        if key in meta["settings"] and meta["settings"][key] != value:
            raise ConfigError(
                f"checkpoint {path} was written with {key}={meta['settings'][key]!r}, this run has "
                f"{key}={value!r}: resume with the same setting or use another run.dir")


def scan(run_dir: Path, cfg, topology, data, total_steps: int) -> list[tuple[int, str | None]]:
    """Every step some model has a checkpoint file for, newest first, with None if every model
    completed it, else why not (a file truncated or missing, a garbage sidecar, a model without it).

    ConfigError (exit 2), naming the newest checkpoint: one written with other ranks or settings;
    checkpoints present but no step that every model completed (a fresh start beside them would
    prune them away)."""
    expected = settings(cfg, data, total_steps)
    complete, skipped, present = [], {}, []
    for m in range(topology.n_models):
        files, mine = _step_files(model_dir(run_dir, m)), set()
        present.append(sorted(files))
        for step in sorted(files, reverse=True):            # newest first: an error names the newest
            if ".json" not in files[step]:
                skipped.setdefault(step, []).append(f"{step_path(run_dir, m, step, '.pt')} has no sidecar "
                                                    "(its write was interrupted)")
                continue
            meta, why = _read_meta(step_path(run_dir, m, step, ".json"))
            if meta is None:
                skipped.setdefault(step, []).append(why)
                continue
            _check_settings(step_path(run_dir, m, step, ".json"), meta, topology, expected)
            mine.add(step)
        complete.append(mine)
    common = sorted(set.intersection(*complete), reverse=True) if complete else []
    if not common and any(present):
        where = run_dir / "checkpoints"
        why = "; ".join(f"model {m} has none ({model_dir(run_dir, m)} is missing or empty)" if not present[m]
                        else f"model {m} has no complete one" if not complete[m]
                        else f"model {m} completed steps {sorted(complete[m])}"
                        for m in range(topology.n_models))
        damaged = sorted({w for ws in skipped.values() for w in ws})
        raise ConfigError(
            f"{where} holds checkpoints but no step that every model completed ({why}"
            f"{'; ' + damaged[0] if damaged else ''}): restore the missing or damaged files, or use a new "
            "run.dir (a run from step 0 here would replace them)")
    out = []
    for step in sorted({s for files in present for s in files}, reverse=True):
        lacking = [m for m in range(topology.n_models) if step not in complete[m]]
        absent = [str(m) for m in lacking if step not in present[m]]
        why = "; ".join(skipped.get(step, []) + ([f"model {', '.join(absent)} has no file of it"] if absent else []))
        out.append((step, why if lacking else None))
    return out


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


def find_resume(world, cfg, topology, data, total_steps: int) -> tuple[int, dict | None]:
    """Every rank, before anything is written to run.dir: the newest step that every model
    completed and every rank can read and verify, and this rank's model's state at it (on the
    CPU, applied by `apply` once the trainer exists); (0, None) when run.dir holds no checkpoint.
    Each step skipped is a warning; no usable step among checkpoints present is a ConfigError."""
    run_dir, rank = Path(cfg.run.dir), world.Get_rank()

    def warn(text: str) -> None:
        if rank == 0:
            print(f"hvcodistill: warning: {text}", file=sys.stderr, flush=True)

    # COMM_WORLD: world rank 0 reads the sidecars; everyone gets the same candidate list (or error).
    found = None
    if rank == 0:
        try:
            found = (scan(run_dir, cfg, topology, data, total_steps), None)
        except ConfigError as e:
            found = (None, str(e))
    candidates, error = world.bcast(found, root=0)
    if error:
        raise ConfigError(error)
    model_id, unreadable = topology.model_id(rank), None
    for step, why in candidates:
        if why is not None:
            warn(f"checkpoint step {step} is incomplete ({why}); trying the previous one")
            continue
        state = load_verified(run_dir, model_id, step)
        # COMM_WORLD: resume only from a step that every rank could read and verify.
        bad = sorted({topology.model_id(r) for r, ok in enumerate(world.allgather(state is not None)) if not ok})
        if not bad:
            if rank == 0:
                print(f"hvcodistill: resuming from step {step} ({run_dir / 'checkpoints'})", file=sys.stderr,
                      flush=True)
            return step, state
        unreadable = (step, bad)
        warn(f"checkpoint step {step} is corrupt or unreadable on some rank (model {', '.join(map(str, bad))}: "
             "its sha256 does not match or it cannot be loaded); trying the previous one")
    if unreadable:
        step, bad = unreadable
        raise ConfigError(f"{run_dir / 'checkpoints'} holds checkpoints but none that every rank can read and "
                          f"verify (the last tried, step {step}, is corrupt for model {', '.join(map(str, bad))}): "
                          "restore the damaged files, or use a new run.dir (a run from step 0 here would "
                          "replace them)")
    return 0, None


def apply(tr, state: dict) -> None:
    """Every rank: continue exactly from `state` (find_resume's), on the trainer's device."""
    mine = state["ranks"][tr.comms.group_rank]
    tr.model.load_state_dict(state["model"])
    _load_buffers(tr.model, mine["buffers"])
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scaler.load_state_dict(state["scaler"])
    # what every rank of the group holds alike: teachers and a refresh not yet installed (weights
    # mode); a checkpoint from before `exchange` kept them at the top level
    tr.exchange.load_group_state_dict(state["exchange"] if "exchange" in state else
                                      {"teachers": state["teachers"], "pending_refresh": state.get("pending_refresh")})
    tr.timer.load_state_dict(mine["timer"])
    tr.exchange.load_state_dict(mine["exchange"])
    tr.traffic.load_state_dict(mine["traffic"])
    _set_rng_state(mine["rng"], tr.device)
