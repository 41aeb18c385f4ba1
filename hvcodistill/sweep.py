"""Run a study: every (variant, seed) of a study file, one run after another, or as a SLURM job array.

    python -m hvcodistill.sweep studies/paper_miniature.yaml             # run it (again: continues)
    python -m hvcodistill.sweep studies/paper_miniature.yaml --dry-run   # list the runs and their state
    python -m hvcodistill.sweep studies/imagenet_resnet50.yaml --slurm   # one job array, a task per run
    python -m hvcodistill.report runs/studies/paper_miniature             # then: report.md and figures

Each run trains in `<study dir>/<variant>/seed_<s>/` through hvcodistill.launch (mpirun on this
machine), its output in `run.log` there. Finished runs (summary.json) are skipped; an interrupted
one resumes from its newest checkpoint (the study sets run.checkpoint_every); a failed one is
reported (exit code, last error line, log) and the study goes on. Ctrl-C (or SIGTERM) asks the
running ranks to write a checkpoint and stop (a second Ctrl-C kills them): the same command
continues later. Exit codes: 0 every selected run finished; 1 a run failed; 2 bad input (the study
file, a run's config); 75 stopped by a signal. The study file format: hvcodistill/studies/spec.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hvcodistill.errors import ConfigError
from hvcodistill.studies.spec import REPO_ROOT, Run, Study, checkpoint_step, load_study, run_state, select_runs

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 75
SWEEP_SBATCH = REPO_ROOT / "slurm" / "sweep.sbatch"
LOG_NAME = "run.log"
RESULT_NAME = "sweep_run.json"     # what the last local attempt of a run ended with


def say(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ----------------------------------------------------------------------------- one run
class Launcher:
    """Starts one run's ranks and waits; a stop signal becomes SIGUSR1 to mpirun (the ranks write a
    checkpoint and exit 75), a second one kills the run."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stops = 0

    def on_signal(self, signum, frame) -> None:
        self.stops += 1
        if self.proc is None or self.proc.poll() is not None:
            if self.stops > 1:
                raise KeyboardInterrupt
            return
        if self.stops == 1:
            say(f"got {signal.Signals(signum).name}: the running ranks write a checkpoint and stop "
                "(again to kill them); run the same command to continue")
            self.proc.send_signal(signal.SIGUSR1)
        else:
            say("killing the running ranks")
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def run(self, run: Run, log: Path) -> int:
        from hvcodistill.launch import mpirun_command

        cmd, env = mpirun_command(run.ranks, run.train_argv(sys.executable))
        env["PYTHONUNBUFFERED"] = "1"
        with open(log, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} hvcodistill.sweep: {run.name}\n"
                      f"{shlex.join(cmd)}\n".encode())
            out.flush()
            # A session of its own: Ctrl-C in the terminal reaches the sweep only, which asks the
            # ranks to checkpoint rather than letting mpirun kill them mid-step.
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return self.proc.wait()
        finally:
            self.proc = None


def last_error_line(log: Path) -> str:
    """The line of a run's log that best says why it failed: the last one naming an error."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        lower = line.lower()
        if ("error" in lower or "exception" in lower or "killed" in lower or "abort" in lower) \
                and not line.startswith("==="):
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"


def config_drift(run: Run) -> list[str]:
    """Keys on which a finished run's saved config differs from what the study asks now (run.*
    and the progress bar aside): a changed study does not silently reuse old results."""
    import yaml

    from hvcodistill.config import load_config

    saved_path = run.dir / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        return ["config.yaml (unreadable)"]
    wanted = load_config(run.config, list(run.overrides)).to_dict()
    return [f"{section}.{key}" for section, values in wanted.items() if section != "run"
            for key, value in values.items()
            if f"{section}.{key}" != "train.progress" and saved.get(section, {}).get(key) != value]


def fresh_start(run: Run) -> None:
    """A run that started but left no checkpoint starts over: drop its partial metrics and events,
    which the new attempt would otherwise append to (its log is kept and appended to)."""
    for name in ("metrics.jsonl", "summary.json"):
        (run.dir / name).unlink(missing_ok=True)
    shutil.rmtree(run.dir / "tb", ignore_errors=True)


def write_study_json(study: Study) -> None:
    from hvcodistill.training.metrics import write_json_atomic

    study.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(study.dir / "study.json", study.to_json())


# ----------------------------------------------------------------------------- the study, locally
def run_locally(study: Study, runs: list, launcher: Launcher | None = None) -> int:
    """The runs one after another: finished ones skipped, the others started or resumed."""
    launcher = launcher or Launcher()
    n, start = len(runs), time.monotonic()
    ran_seconds, ran, failed = 0.0, 0, []
    to_run = sum(run_state(r) != "done" for r in runs)
    say(f"study {study.name}: {n} runs ({n - to_run} finished, {to_run} to run) in {study.dir}")
    previous = {sig: signal.signal(sig, launcher.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, run in enumerate(runs, start=1):
            where = f"run {i}/{n} {run.name}"
            state = run_state(run)
            if state == "done":
                drift = config_drift(run)
                note = f" (its config differs now: {', '.join(drift[:4])}; delete {run.dir} to rerun)" if drift else ""
                say(f"{where}: finished earlier, skipped{note}")
                continue
            if launcher.stops:
                break
            eta = f" · about {duration(ran_seconds / ran * (to_run - ran))} left" if ran else ""
            say(f"{where}: {STARTS[state](run)} on {run.ranks} ranks · elapsed {duration(time.monotonic() - start)}{eta}")
            outcome, took = attempt(run, state, launcher, where)
            if outcome == "stopped":
                break
            ran, ran_seconds = ran + 1, ran_seconds + took
            if outcome == "failed":
                failed.append(run)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    done = sum(run_state(r) == "done" for r in runs)
    say(f"study {study.name}: {done} of {n} runs finished, {len(failed)} failed this time, "
        f"{duration(time.monotonic() - start)}; report: python -m hvcodistill.report {_relative(study.dir)}")
    for run in failed:
        say(f"  failed: {run.name} · log {run.dir / LOG_NAME}")
    if launcher.stops:
        say("stopped: run the same command to continue (finished runs are skipped, interrupted ones resume)")
        return EXIT_STOPPED
    return EXIT_FAILED if failed else 0


STARTS = {"interrupted": lambda run: f"resuming from step {checkpoint_step(run.dir)}",
          "started": lambda run: "starting over", "new": lambda run: "starting"}


def attempt(run: Run, state: str, launcher: Launcher, where: str) -> tuple[str, float]:
    """Train one run to its end; returns (done | failed | stopped, seconds), having said which."""
    if state == "started":
        fresh_start(run)
    run.dir.mkdir(parents=True, exist_ok=True)
    log = run.dir / LOG_NAME
    began = time.monotonic()
    code = launcher.run(run, log)
    took = time.monotonic() - began
    _record(run, code, took, log)
    if code == 0 and (run.dir / "summary.json").is_file():
        say(f"{where}: done in {duration(took)} · {_result_line(run)}")
        return "done", took
    if launcher.stops:
        say(f"{where}: stopped (exit {code}) after {duration(took)}; checkpoint in {run.dir / 'checkpoints'}")
        return "stopped", took
    say(f"{where}: FAILED (exit {code}) after {duration(took)}: {last_error_line(log)} · log {log}")
    return "failed", took


def _record(run: Run, code: int, seconds: float, log: Path) -> None:
    from hvcodistill.training.metrics import write_json_atomic

    result = {"exit_code": code, "seconds": seconds, "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "log": str(log)}
    if code != 0:
        result["error"] = last_error_line(log)
    write_json_atomic(run.dir / RESULT_NAME, result)


def _result_line(run: Run) -> str:
    s = json.loads((run.dir / "summary.json").read_text())
    accs = " ".join(f"{m['val_accuracy']:.3f}" for m in s["models"])
    return f"val accuracy {accs} · ensemble {s['ensemble_val_accuracy']:.3f} · disagreement {s['disagreement']:.3f}"


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- the study, on SLURM
def run_list_line(task: int, run: Run) -> str:
    """One line of the run list that slurm/sweep.sbatch reads: task, variant, seed, ranks, config,
    run dir, overrides (space-separated; run.dir travels in its own column)."""
    overrides = [o for o in run.overrides if not o.startswith("run.dir=")]
    fields = [str(task), run.variant, str(run.seed), str(run.ranks), run.config, str(run.dir), " ".join(overrides)]
    for value in fields[:-1] + overrides:
        if any(c.isspace() for c in value):
            raise ConfigError(f"run {run.name}: {value!r} holds whitespace, which the SLURM run list cannot "
                              "carry (write lists as [1,2], no spaces)")
    return "\t".join(fields)


def submit_slurm(study: Study, runs: list, *, sbatch_args: str = "", max_parallel: int = 0,
                 dry_run: bool = False) -> int:
    """One job array per ranks count (a job array asks the same resources for every task), holding
    the runs not finished yet. Each task runs one run through slurm/codistill.sbatch, with its
    preemption handling: SIGUSR1 before the time limit -> checkpoint -> exit 75 -> requeue."""
    todo = [r for r in runs if run_state(r) != "done"]
    say(f"study {study.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to submit")
    if not todo:
        return 0
    if not dry_run:
        if shutil.which("sbatch") is None:
            raise ConfigError("--slurm: no sbatch on PATH (run this on a SLURM login node)")
        # Two jobs training one run directory would corrupt it: submit only when none is left.
        import getpass
        active = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-n", f"sweep-{study.name}", "-o", "%i"],
                                capture_output=True, text=True).stdout.split()
        if active:
            raise ConfigError(f"--slurm: jobs of study {study.name} are still queued or running ({', '.join(active[:5])}): "
                              "wait for them (squeue) or scancel them, then submit again")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    by_ranks: dict[int, list] = {}
    for run in todo:
        by_ranks.setdefault(run.ranks, []).append(run)
    for ranks, group in sorted(by_ranks.items()):
        lines = [run_list_line(task, run) for task, run in enumerate(group)]
        run_list = study.dir / "slurm" / f"runs-{stamp}-np{ranks}.tsv"
        array = f"0-{len(group) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        cmd = ["sbatch", "--parsable", f"--array={array}", f"--ntasks={ranks}", f"--job-name=sweep-{study.name}",
               f"--output={study.dir / 'slurm'}/%x-%A_%a.out", "--export=ALL", *shlex.split(sbatch_args),
               str(SWEEP_SBATCH)]
        if dry_run:
            say(f"would write {run_list} ({len(group)} runs) and run: RUN_LIST={run_list} {shlex.join(cmd)}")
            for line in lines:
                print("    " + line.replace("\t", "  "))
            continue
        run_list.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_list.with_name(run_list.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(run_list)
        for run in group:
            run.dir.mkdir(parents=True, exist_ok=True)
            if run_state(run) == "started":
                fresh_start(run)
        # The repository travels with the job: a batch script runs from slurmd's spool directory.
        env = dict(os.environ, RUN_LIST=str(run_list))
        env.setdefault("HVCODISTILL_ROOT", str(REPO_ROOT))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            say(f"sbatch failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
            return EXIT_FAILED
        job = proc.stdout.strip().split(";")[0]
        say(f"submitted job array {job}: {len(group)} runs of {ranks} ranks (tasks {array}), run list {run_list}")
        say(f"  watch: squeue -j {job} · each run logs to <run dir>/{LOG_NAME} · then: "
            f"python -m hvcodistill.report {_relative(study.dir)}")
    return 0


# ----------------------------------------------------------------------------- the CLI
def dry_run_listing(study: Study, runs: list) -> None:
    say(f"study {study.name} ({study.source}): {len(runs)} runs in {study.dir}")
    base = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    width = max((len(r.name) for r in runs), default=10)
    same_config = len({r.config for r in runs}) <= 1
    for i, run in enumerate(runs, start=1):
        state = run_state(run)
        if state == "interrupted":
            state = f"resume at step {checkpoint_step(run.dir)}"
        own = [o for o in run.overrides if o not in base and not o.startswith(("train.seed=", "run.dir="))]
        if not same_config:
            own.insert(0, f"--config {_relative(Path(run.config))}")
        print(f"  {i:3d}/{len(runs)}  {run.name:<{width}}  {run.ranks} ranks  {state:<18}  {' '.join(own)}")
    if runs:
        config = f"--config {_relative(Path(runs[0].config))} " if same_config else ""
        print(f"  every run: {config}{' '.join(sorted(base))} (and train.seed, run.dir)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m hvcodistill.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study file (studies/*.yaml)")
    p.add_argument("--dir", help="study directory (default: the study's `dir`, else runs/studies/<name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished runs as a SLURM job array")
    p.add_argument("--sbatch-args", default="", help="more sbatch options, e.g. '--partition=gpu --time=24:00:00'")
    p.add_argument("--max-parallel", type=int, default=0, help="--slurm: at most this many tasks at once")
    p.add_argument("--only", help="comma-separated variants (or base names of grid variants) to run")
    p.add_argument("--seeds", help="comma-separated seeds to run (of the study's)")
    p.add_argument("--set", action="append", default=[], metavar="dotted.key=value",
                   help="an override for every run, after the study's (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.study, study_dir=args.dir, extra_overrides=args.set)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        runs = select_runs(study, only=args.only.split(",") if args.only else None, seeds=seeds)
        if args.slurm:
            if not args.dry_run:
                write_study_json(study)
            return submit_slurm(study, runs, sbatch_args=args.sbatch_args, max_parallel=args.max_parallel,
                                dry_run=args.dry_run)
        if args.dry_run:
            dry_run_listing(study, runs)
            return 0
        write_study_json(study)
        return run_locally(study, runs)
    except ConfigError as e:
        print(f"hvcodistill.sweep: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:        # --seeds not integers
        print(f"hvcodistill.sweep: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
