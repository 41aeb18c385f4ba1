"""Run a study: every (variant, seed) of a study file, one run after another, or as a SLURM job
array.

    python -m hvcodistill.sweep studies/paper_miniature.yaml            # run it (again: continues)
    python -m hvcodistill.sweep studies/paper_miniature.yaml --dry-run  # the runs and their state
    python -m hvcodistill.sweep studies/imagenet_resnet50.yaml --slurm  # a job array, a task a run
    python -m hvcodistill.report runs/studies/paper_miniature            # then: report.md, figures

Each run trains in `<study dir>/<variant>/seed_<s>/` through hvcodistill.launch (mpirun on this
machine), its output in `run.log` there. Finished runs (summary.json) are skipped; an interrupted
one resumes from its newest checkpoint (the study sets run.checkpoint_every); a failed one is
reported (exit code, last error line, log) and the study goes on. Ctrl-C (or SIGTERM) asks the
running ranks to write a checkpoint and stop (a second Ctrl-C kills them): the same command
continues later. Exit codes: 0 every selected run finished; 1 a run failed; 2 bad input (the
study file, a run's config); 75 stopped by a signal. The study file format:
hvcodistill/studies/spec.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hvcodistill.errors import EXIT_BAD_INPUT, ConfigError
from hvcodistill.studies.runner import relative, run_locally, say, submit_slurm, write_study_json
from hvcodistill.studies.spec import (
    REPO_ROOT,
    Study,
    checkpoint_step,
    load_study,
    run_state,
    select_runs,
)

SWEEP_SBATCH = REPO_ROOT / "slurm" / "sweep.sbatch"


def dry_run_listing(study: Study, runs: list) -> None:
    say(f"study {study.name} ({study.source}): {len(runs)} runs in {study.dir}")
    base = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    width = max((len(r.name) for r in runs), default=10)
    same_config = len({r.config for r in runs}) <= 1
    for i, run in enumerate(runs, start=1):
        state = run_state(run)
        if state == "interrupted":
            state = f"resume at step {checkpoint_step(run.dir)}"
        own = [
            o
            for o in run.overrides
            if o not in base and not o.startswith(("train.seed=", "run.dir="))
        ]
        if not same_config:
            own.insert(0, f"--config {relative(Path(run.config))}")
        print(
            f"  {i:3d}/{len(runs)}  {run.name:<{width}}  {run.ranks} ranks  {state:<18}  "
            f"{' '.join(own)}"
        )
    if runs:
        config = f"--config {relative(Path(runs[0].config))} " if same_config else ""
        print(f"  every run: {config}{' '.join(sorted(base))} (and train.seed, run.dir)")


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m hvcodistill.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("study", help="study file (studies/*.yaml)")
    add("--dir", help="study directory (default: the study's `dir`, else runs/studies/<name>)")
    add("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    add("--slurm", action="store_true", help="submit the unfinished runs as a SLURM job array")
    add(
        "--sbatch-args",
        default="",
        help="more sbatch options, e.g. '--partition=gpu --time=24:00:00'",
    )
    add("--max-parallel", type=int, default=0, help="--slurm: at most this many tasks at once")
    add("--only", help="comma-separated variants (or base names of grid variants) to run")
    add("--seeds", help="comma-separated seeds to run (of the study's)")
    add(
        "--set",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="an override for every run, after the study's (repeatable)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        study = load_study(args.study, study_dir=args.dir, extra_overrides=args.set)
        only = args.only.split(",") if args.only else None
        runs = select_runs(study, only=only, seeds=seeds)
        if args.slurm:
            if not args.dry_run:
                write_study_json(study)
            return submit_slurm(
                study,
                runs,
                sbatch=SWEEP_SBATCH,
                sbatch_args=args.sbatch_args,
                max_parallel=args.max_parallel,
                dry_run=args.dry_run,
            )
        if args.dry_run:
            dry_run_listing(study, runs)
            return 0
        write_study_json(study)
        return run_locally(study, runs)
    except ConfigError as e:
        print(f"hvcodistill.sweep: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
