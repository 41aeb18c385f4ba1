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
import pickle
import re
import sys
from pathlib import Path

import torch

from hvcodistill.comm.traffic import gather_sends
from hvcodistill.errors import CheckpointWriteError, ConfigError
from hvcodistill.files import write_atomic


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


def _write(
    run_dir: Path, step: int, comms, rank_state: dict, group_state: dict, sidecar: dict, traffic
) -> str | None:
    """Group rank 0 writes the model's checkpoint: `group_state` (what every rank of the group
    holds alike) and every rank's `rank_state`, gathered. Returns why it could not be written
    (disk full, unwritable), having removed what it began."""
    traffic.add(
        "checkpoint",
        gather_sends(
            comms.group_ranks[0], comms.world_rank, len(pickle.dumps(rank_state)), comms.nodes
        ),
    )
    rank_state = {**rank_state, "traffic": traffic.state_dict()}
    # group_comm: the per-rank state of every rank of this model travels to group rank 0
    ranks = comms.group.gather(rank_state, root=0)
    if comms.group_rank != 0:
        return None
    buf = io.BytesIO()
    torch.save({"step": step, **group_state, "ranks": ranks}, buf)
    data = buf.getvalue()
    meta = {
        "step": step,
        "model_id": comms.model_id,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "topology": comms.topology.as_dict(),
        "settings": sidecar,
    }
    pt, json_path = (
        step_path(run_dir, comms.model_id, step, suffix) for suffix in (".pt", ".json")
    )
    path = pt.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        path = pt
        write_atomic(pt, data)
        path = json_path
        write_atomic(json_path, (json.dumps(meta, indent=1) + "\n").encode())
    except OSError as e:
        for done in (json_path, pt):  # no file of this step is left to be mistaken for one
            with contextlib.suppress(OSError):
                done.unlink(missing_ok=True)
        return f"cannot write checkpoint {path}: {e.strerror or e}"
    return None


def save(
    run_dir: Path,
    step: int,
    *,
    comms,
    rank_state: dict,
    group_state: dict,
    settings: dict,
    keep: int,
    traffic,
) -> None:
    """Called by every rank at the same step: write, then prune once every model has written.
    `traffic` (this rank's byte counter) counts the gather and is saved with the rank's state.

    A writer that fails (disk full, unwritable) fails alone; the allgather tells every rank, which
    then raise CheckpointWriteError together, the previous checkpoint untouched."""
    error = _write(run_dir, step, comms, rank_state, group_state, settings, traffic)
    # COMM_WORLD: no model drops an older checkpoint before every model has this one, so a crash
    # mid-write always leaves a step that all models share; and every rank learns of a failed write.
    errors = [e for e in comms.world.allgather(error) if e]
    if errors:
        raise CheckpointWriteError(
            f"{errors[0]}; the checkpoint before step {step} is kept: free space (or fix the "
            "permissions), then run the same command to resume from it",
            agreed=True,
        )
    if comms.group_rank == 0:
        _prune(model_dir(run_dir, comms.model_id), keep=keep)


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
            f"checkpoint {path} was written by "
            f"W={t['world_size']} M={t['n_models']} G={t['group_size']}, "
            f"this run is W={topology.world_size} M={topology.n_models} G={topology.group_size}: "
            "resume with the same ranks or use another run.dir"
        )
    for key, value in expected.items():
        if key not in meta["settings"]:
            raise ConfigError(
                f"checkpoint {path} does not record {key} (written by another version of "
                "hvcodistill): it cannot be checked against this run; use another run.dir"
            )
        if meta["settings"][key] != value:
            raise ConfigError(
                f"checkpoint {path} was written with {key}={meta['settings'][key]!r}, this run has "
                f"{key}={value!r}: resume with the same setting or use another run.dir"
            )


def scan(run_dir: Path, topology, expected: dict) -> list[tuple[int, str | None]]:
    """Every step some model has a checkpoint file for, newest first, with None if every model
    completed it, else why not (a file truncated or missing, a garbage sidecar, a model without it).

    ConfigError (exit 2), naming the newest checkpoint: one written with other ranks or settings;
    checkpoints present but no step that every model completed (a fresh start beside them would
    prune them away)."""
    complete, skipped, present = [], {}, []
    for m in range(topology.n_models):
        files, mine = _step_files(model_dir(run_dir, m)), set()
        present.append(sorted(files))
        for step in sorted(files, reverse=True):  # newest first: an error names the newest
            if ".json" not in files[step]:
                skipped.setdefault(step, []).append(
                    f"{step_path(run_dir, m, step, '.pt')} has no sidecar "
                    "(its write was interrupted)"
                )
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
        why = "; ".join(
            f"model {m} has none ({model_dir(run_dir, m)} is missing or empty)"
            if not present[m]
            else f"model {m} has no complete one"
            if not complete[m]
            else f"model {m} completed steps {sorted(complete[m])}"
            for m in range(topology.n_models)
        )
        damaged = sorted({w for ws in skipped.values() for w in ws})
        raise ConfigError(
            f"{where} holds checkpoints but no step that every model completed ({why}"
            f"{'; ' + damaged[0] if damaged else ''}): restore the missing or damaged files, "
            "or use a new "
            "run.dir (a run from step 0 here would replace them)"
        )
    out = []
    for step in sorted({s for files in present for s in files}, reverse=True):
        lacking = [m for m in range(topology.n_models) if step not in complete[m]]
        absent = [str(m) for m in lacking if step not in present[m]]
        why = "; ".join(
            skipped.get(step, [])
            + ([f"model {', '.join(absent)} has no file of it"] if absent else [])
        )
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


def find_resume(world, run_dir: Path, topology, expected: dict) -> tuple[int, dict | None]:
    """Every rank, before anything is written to run.dir: the newest step that every model
    completed and every rank can read and verify, and this rank's model's state at it (on the
    CPU, applied by `apply` once the trainer exists); (0, None) when run.dir holds no checkpoint.
    Each step skipped is a warning; no usable step among checkpoints present is a ConfigError."""
    rank = world.Get_rank()

    def warn(text: str) -> None:
        if rank == 0:
            print(f"hvcodistill: warning: {text}", file=sys.stderr, flush=True)

    # COMM_WORLD: world rank 0 reads the sidecars; everyone gets the same candidate list (or error).
    found = None
    if rank == 0:
        try:
            found = (scan(run_dir, topology, expected), None)
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
        bad = sorted(
            {
                topology.model_id(r)
                for r, ok in enumerate(world.allgather(state is not None))
                if not ok
            }
        )
        if not bad:
            if rank == 0:
                print(
                    f"hvcodistill: resuming from step {step} ({run_dir / 'checkpoints'})",
                    file=sys.stderr,
                    flush=True,
                )
            return step, state
        unreadable = (step, bad)
        warn(
            f"checkpoint step {step} is corrupt or unreadable on some rank "
            f"(model {', '.join(map(str, bad))}: "
            "its sha256 does not match or it cannot be loaded); trying the previous one"
        )
    if unreadable:
        step, bad = unreadable
        raise ConfigError(
            f"{run_dir / 'checkpoints'} holds checkpoints but none that every rank can read and "
            f"verify (the last tried, step {step}, is corrupt for model "
            f"{', '.join(map(str, bad))}): "
            "restore the damaged files, or use a new run.dir (a run from step 0 here would "
            "replace them)"
        )
    return 0, None
