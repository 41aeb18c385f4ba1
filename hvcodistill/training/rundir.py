"""The run directory: its entries of the right kind, and one directory that every node shares.

Both are checked before anything of the run is written there (train.open_run_dir), so a refused
start leaves run.dir as it was. Pure file-system helpers; the ranks' agreement is train.py's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from hvcodistill.errors import ConfigError

MARKERS = ".writers"        # run.dir/.writers/model_<i>.<host>.<token>, removed after the check


def check_entries(run_dir: Path, n_models: int) -> None:
    """Each path the run writes is absent or of the kind the run writes (a file or a directory)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} is a file, not a directory: use another run.dir")
    files = ["config.yaml", "metrics.jsonl", "summary.json", *(f"model_{m}.pt" for m in range(n_models))]
    dirs = ["checkpoints", "tb", *(f"{d}/model_{m}" for d in ("checkpoints", "tb") for m in range(n_models))]
    for names, is_kind, kind in ((files, Path.is_file, "a file"), (dirs, Path.is_dir, "a directory")):
        for name in names:
            p = run_dir / name
            if (p.exists() or p.is_symlink()) and not is_kind(p):
                raise ConfigError(f"run.dir entry {p} should be {kind} (the run writes it as one), but it is "
                                  "not: move it away or use another run.dir")


def leave_marker(run_dir: Path, model_id: int, host: str, token: str) -> Path:
    """A checkpoint writer's mark in run.dir, for world rank 0 to look for."""
    directory = run_dir / MARKERS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"model_{model_id}.{host}.{token}"
    path.write_text(f"{host}\n")
    return path


def check_markers(run_dir: Path, writers: dict[int, str], token: str, host: str) -> None:
    """World rank 0 (on `host`) sees the mark of every model's writer ({model: its host}), or
    run.dir is not one shared directory: resuming would find some models' checkpoints missing."""
    directory = run_dir / MARKERS
    seen = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    for model_id, writer_host in sorted(writers.items()):
        if f"model_{model_id}.{writer_host}.{token}" not in seen:
            raise ConfigError(
                f"run.dir {run_dir} is not one directory shared by every node: world rank 0 (on {host}) cannot "
                f"see what model {model_id}'s checkpoint writer (on {writer_host}) wrote there; put run.dir on "
                "a file system that every node mounts at the same path")


def remove_marker(path: Path | None, run_dir: Path, *, last: bool) -> None:
    """Remove this writer's mark; `last` (one rank, after everyone's): the markers' directory too."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if last:
        with contextlib.suppress(OSError):
            (run_dir / MARKERS).rmdir()
