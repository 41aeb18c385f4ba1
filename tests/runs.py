"""The session's cache of trained runs: a run that several tests read is trained once per session.

    trained_run(np, *overrides, config=DIGITS) -> Run          (fixture, session scope)

starts `np` real ranks of `python -m hvcodistill.train --config <config> <overrides>
run.dir=<a session folder>` the first time a test asks for this (np, config, overrides) and hands
every later asker the same finished Run:

    Run.dir        the run's directory: READ it, never write it
    Run.summary    its summary.json (a dict)
    Run.np, Run.config, Run.overrides    how it was trained (train_args rebuilds the command)
    Run.stderr     the launcher's stderr

A test that modifies a run (damages a checkpoint, resumes or extends it, or is refused in it)
works on its own copy:

    copy_run(src, dst) -> dst      src: a Run or a directory; dst must not exist yet

    train_args(run_dir, *overrides, config=DIGITS) -> the argv after `python` that run_ranks takes
    (`-m hvcodistill.train --config ... overrides... run.dir=...`): to resume a copy, pass
    `*run.overrides` and a changed setting after them.

The runs of several test files, by name (fixtures; their overrides are this module's constants):

    weights_run   4 ranks, weights mode (CNN with BatchNorm, every 7, disjoint data), 40 steps,
                  a checkpoint every 10, the newest 3 kept (WEIGHTS_RUN)
    short_run     2 ranks, prediction mode (MLP), 20 steps, a checkpoint every 10, constant lr so
                  that train.steps may grow on resume (SHORT_RUN)

Ask for a new shared run with trained_run (or add a named fixture here) rather than a launch of
your own when another test trains the same thing: a launch costs 5-30 s. At the session's end every
cached run must be byte for byte as trained; a test that wrote into one fails the session there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_ranks

DIGITS = str(ROOT / "configs" / "digits_codistill.yaml")
# what no cached run logs or evaluates on the way (keeps them fast, and alike)
QUIET = ("train.epochs=0", "train.eval_every=0", "train.progress=false", "train.log_every=5")
# a CNN has BatchNorm buffers: per-rank state that must come back exactly on resume, teachers' too
WEIGHTS_MODE = (
    "codistill.mode=weights",
    "codistill.every=7",
    "data.order=disjoint",
    "model.name=cnn",
)
WEIGHTS_RUN = (
    *QUIET,
    *WEIGHTS_MODE,
    "train.steps=40",
    "run.checkpoint_every=10",
    "run.keep_checkpoints=3",
)
SHORT_RUN = (*QUIET, "train.steps=20", "run.checkpoint_every=10", "optim.lr_schedule=constant")


@dataclass(frozen=True)
class Run:
    dir: Path
    summary: dict
    np: int
    config: str
    overrides: tuple[str, ...]
    stderr: str


def train_args(run_dir: Path, *overrides: str, config: str = DIGITS) -> list[str]:
    """The trainer's argv for run_ranks: `-m hvcodistill.train --config <config> <overrides>
    run.dir=<run_dir>` (run.dir last: it wins over any in the overrides)."""
    return ["-m", "hvcodistill.train", "--config", config, *overrides, f"run.dir={run_dir}"]


def copy_run(src: Run | Path, dst: Path) -> Path:
    """A copy of a run's directory (checkpoints, logs, summary) at `dst`, for a test to modify."""
    shutil.copytree(src.dir if isinstance(src, Run) else src, dst, symlinks=True)
    return dst


def _fingerprint(run_dir: Path) -> dict[str, str | None]:
    return {
        str(p.relative_to(run_dir)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        )
        for p in sorted(run_dir.rglob("*"))
    }


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """trained_run(np, *overrides, config=DIGITS) -> Run: trained once per session (see module)."""
    cache: dict[tuple, Run] = {}
    failed: dict[tuple, str] = {}
    prints: dict[Path, dict] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(np: int, *overrides: str, config: str = DIGITS) -> Run:
        key = (np, config, overrides)
        if key in failed:
            pytest.fail(failed[key])
        if key not in cache:
            run_dir = root / f"run{len(cache) + len(failed)}"
            proc = run_ranks(np, train_args(run_dir, *overrides, config=config), check=False)
            if proc.returncode != 0:
                failed[key] = (
                    f"the cached run ({np} ranks: {' '.join(overrides)}) exited "
                    f"{proc.returncode}\n{proc.stderr[-4000:]}"
                )
                pytest.fail(failed[key])
            summary = json.loads((run_dir / "summary.json").read_text())
            cache[key] = Run(run_dir, summary, np, config, overrides, proc.stderr)
            prints[run_dir] = _fingerprint(run_dir)
        return cache[key]

    yield get
    changed = [str(d) for d, before in prints.items() if _fingerprint(d) != before]
    assert not changed, f"tests wrote into cached runs (use copy_run): {changed}"


@pytest.fixture(scope="session")
def weights_run(trained_run) -> Run:
    """4 ranks, weights mode with BatchNorm buffers, 40 steps, checkpoints at 20, 30, 40 kept."""
    return trained_run(4, *WEIGHTS_RUN)


@pytest.fixture(scope="session")
def short_run(trained_run) -> Run:
    """2 ranks, prediction mode, 20 steps, checkpoints at 10 and 20, constant lr."""
    return trained_run(2, *SHORT_RUN)
