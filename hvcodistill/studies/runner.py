"""Running a study's runs: one after another on this machine, or as SLURM job arrays.

Each run trains in `<study dir>/<variant>/seed_<s>/` through mpirun, its output in `run.log`
there. Finished runs (summary.json) are skipped; an interrupted one resumes from its newest
checkpoint; a failed one is reported (exit code, last error line, log) and the study goes on. A
stop signal asks the running ranks to write a checkpoint and stop; a second one kills them.
The command is hvcodistill.sweep.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hvcodistill.config import load_config
from hvcodistill.errors import EXIT_FAILED, EXIT_PREEMPTED, ConfigError
from hvcodistill.files import write_atomic
from hvcodistill.mpirun import mpirun_command
from hvcodistill.studies.spec import (
    LOG_NAME,
    REPO_ROOT,
    RESULT_NAME,
    Run,
    Study,
    checkpoint_step,
    run_state,
)


def say(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, written atomically; the sweep's process stays free of torch and
    MPI (it starts the ranks)."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def relative(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else as given."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- one run
class Launcher:
    """Starts one run's ranks and waits; a stop signal becomes SIGUSR1 to mpirun (the ranks write
    a checkpoint and exit 75), a second one kills the run."""

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
            say(
                f"got {signal.Signals(signum).name}: the running ranks write a checkpoint and "
                "stop (again to kill them); run the same command to continue"
            )
            self.proc.send_signal(signal.SIGUSR1)
        else:
            say("killing the running ranks")
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def run(self, run: Run, log: Path) -> int:
        cmd, env = mpirun_command(run.ranks, run.train_argv(sys.executable))
        env["PYTHONUNBUFFERED"] = "1"
        with open(log, "ab") as out:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"\n=== {stamp} hvcodistill.sweep: {run.name}\n{shlex.join(cmd)}\n".encode())
            out.flush()
            # A session of its own: Ctrl-C in the terminal reaches the sweep only, which asks the
            # ranks to checkpoint rather than letting mpirun kill them mid-step.
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            return self.proc.wait()
        finally:
            self.proc = None


def last_error_line(log: Path) -> str:
    """The line of a run's log that best says why it failed: the last one naming an error."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        lower = line.lower()
        named = any(word in lower for word in ("error", "exception", "killed", "abort"))
        if named and not line.startswith("==="):
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"


def config_drift(run: Run) -> list[str]:
    """Keys on which a finished run's saved config differs from what the study asks now (run.*
    and the progress bar aside): a changed study does not silently reuse old results."""
    saved_path = run.dir / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        return ["config.yaml (unreadable)"]
    wanted = load_config(run.config, list(run.overrides)).to_dict()
    return [
        f"{section}.{key}"
        for section, values in wanted.items()
        if section != "run"
        for key, value in values.items()
        if f"{section}.{key}" != "train.progress" and saved.get(section, {}).get(key) != value
    ]


def fresh_start(run: Run) -> None:
    """A run that started but left no checkpoint starts over: drop its partial metrics and
    events, which the new attempt would otherwise append to (its log is kept and appended to)."""
    for name in ("metrics.jsonl", "summary.json"):
        (run.dir / name).unlink(missing_ok=True)
    shutil.rmtree(run.dir / "tb", ignore_errors=True)


def write_study_json(study: Study) -> None:
    study.dir.mkdir(parents=True, exist_ok=True)
    write_json(study.dir / "study.json", study.to_json())


STARTS = {
    "interrupted": lambda run: f"resuming from step {checkpoint_step(run.dir)}",
    "started": lambda run: "starting over",
    "new": lambda run: "starting",
}


def attempt(run: Run, state: str, launcher: Launcher, where: str) -> tuple[str, float]:
    """Train one run to its end; returns (done | failed | stopped, seconds), having said which."""
    if state == "started":
        fresh_start(run)
    run.dir.mkdir(parents=True, exist_ok=True)
    log = run.dir / LOG_NAME
    began = time.monotonic()
    code = launcher.run(run, log)
    took = time.monotonic() - began
    record(run, code, took, log)
    if code == 0 and (run.dir / "summary.json").is_file():
        say(f"{where}: done in {duration(took)} · {result_line(run)}")
        return "done", took
    if launcher.stops:
        say(
            f"{where}: stopped (exit {code}) after {duration(took)}; "
            f"checkpoint in {run.dir / 'checkpoints'}"
        )
        return "stopped", took
    say(f"{where}: FAILED (exit {code}) after {duration(took)}: {last_error_line(log)} · log {log}")
    return "failed", took


def record(run: Run, code: int, seconds: float, log: Path) -> None:
    """What this attempt ended with, beside the run (the report reads it)."""
    result = {
        "exit_code": code,
        "seconds": seconds,
        "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
        "log": str(log),
    }
    if code != 0:
        result["error"] = last_error_line(log)
    write_json(run.dir / RESULT_NAME, result)


def result_line(run: Run) -> str:
    s = json.loads((run.dir / "summary.json").read_text())
    accs = " ".join(f"{m['val_accuracy']:.3f}" for m in s["models"])
    return (
        f"val accuracy {accs} · ensemble {s['ensemble_val_accuracy']:.3f} · "
        f"disagreement {s['disagreement']:.3f}"
    )


# ----------------------------------------------------------------------------- the study, locally
def run_locally(study: Study, runs: list, launcher: Launcher | None = None) -> int:
    """The runs one after another: finished ones skipped, the others started or resumed.
    Returns the exit code: 0, EXIT_FAILED (a run failed) or EXIT_PREEMPTED (stopped)."""
    launcher = launcher or Launcher()
    n, start = len(runs), time.monotonic()
    ran_seconds, ran, failed = 0.0, 0, []
    to_run = sum(run_state(r) != "done" for r in runs)
    say(f"study {study.name}: {n} runs ({n - to_run} finished, {to_run} to run) in {study.dir}")
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, launcher.on_signal) for sig in stop_signals}
    try:
        for i, run in enumerate(runs, start=1):
            where = f"run {i}/{n} {run.name}"
            state = run_state(run)
            if state == "done":
                drift = config_drift(run)
                note = (
                    f" (its config differs now: {', '.join(drift[:4])}; delete {run.dir} to rerun)"
                    if drift
                    else ""
                )
                say(f"{where}: finished earlier, skipped{note}")
                continue
            if launcher.stops:
                break
            elapsed = duration(time.monotonic() - start)
            eta = f" · about {duration(ran_seconds / ran * (to_run - ran))} left" if ran else ""
            say(f"{where}: {STARTS[state](run)} on {run.ranks} ranks · elapsed {elapsed}{eta}")
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
    say(
        f"study {study.name}: {done} of {n} runs finished, {len(failed)} failed this time, "
        f"{duration(time.monotonic() - start)}; "
        f"report: python -m hvcodistill.report {relative(study.dir)}"
    )
    for run in failed:
        say(f"  failed: {run.name} · log {run.dir / LOG_NAME}")
    if launcher.stops:
        say(
            "stopped: run the same command to continue (finished runs are skipped, interrupted "
            "ones resume)"
        )
        return EXIT_PREEMPTED
    return EXIT_FAILED if failed else 0


# ----------------------------------------------------------------------------- the study, on SLURM
def run_list_line(task: int, run: Run) -> str:
    """One line of the run list that slurm/sweep.sbatch reads: task, variant, seed, ranks, config,
    run dir, overrides (space-separated; run.dir travels in its own column)."""
    overrides = [o for o in run.overrides if not o.startswith("run.dir=")]
    fields = [
        str(task),
        run.variant,
        str(run.seed),
        str(run.ranks),
        run.config,
        str(run.dir),
        " ".join(overrides),
    ]
    for value in fields[:-1] + overrides:
        if any(c.isspace() for c in value):
            raise ConfigError(
                f"run {run.name}: {value!r} holds whitespace, which the SLURM run list cannot "
                "carry (write lists as [1,2], no spaces)"
            )
    return "\t".join(fields)


def _check_submittable(study: Study) -> None:
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm: no sbatch on PATH (run this on a SLURM login node)")
    # Two jobs training one run directory would corrupt it: submit only when none is left.
    squeue = ["squeue", "-h", "-u", getpass.getuser(), "-n", f"sweep-{study.name}", "-o", "%i"]
    active = subprocess.run(squeue, capture_output=True, text=True).stdout.split()
    if active:
        raise ConfigError(
            f"--slurm: jobs of study {study.name} are still queued or running "
            f"({', '.join(active[:5])}): wait for them (squeue) or scancel them, then submit again"
        )


def submit_slurm(
    study: Study,
    runs: list,
    *,
    sbatch: Path,
    sbatch_args: str = "",
    max_parallel: int = 0,
    dry_run: bool = False,
) -> int:
    """One job array per ranks count (a job array asks the same resources for every task),
    holding the runs not finished yet, each task running one run through the `sbatch` script
    with its preemption handling: SIGUSR1 before the time limit -> checkpoint -> exit 75 ->
    requeue."""
    todo = [r for r in runs if run_state(r) != "done"]
    say(
        f"study {study.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, "
        f"{len(todo)} to submit"
    )
    if not todo:
        return 0
    if not dry_run:
        _check_submittable(study)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    by_ranks: dict[int, list] = {}
    for run in todo:
        by_ranks.setdefault(run.ranks, []).append(run)
    for ranks, group in sorted(by_ranks.items()):
        lines = [run_list_line(task, run) for task, run in enumerate(group)]
        run_list = study.dir / "slurm" / f"runs-{stamp}-np{ranks}.tsv"
        array = f"0-{len(group) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        cmd = [
            "sbatch",
            "--parsable",
            f"--array={array}",
            f"--ntasks={ranks}",
            f"--job-name=sweep-{study.name}",
            f"--output={study.dir / 'slurm'}/%x-%A_%a.out",
            "--export=ALL",
            *shlex.split(sbatch_args),
            str(sbatch),
        ]
        if dry_run:
            say(
                f"would write {run_list} ({len(group)} runs) and run: "
                f"RUN_LIST={run_list} {shlex.join(cmd)}"
            )
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
        say(
            f"submitted job array {job}: {len(group)} runs of {ranks} ranks (tasks {array}), "
            f"run list {run_list}"
        )
        say(
            f"  watch: squeue -j {job} · each run logs to <run dir>/{LOG_NAME} · then: "
            f"python -m hvcodistill.report {relative(study.dir)}"
        )
    return 0
