"""A tiny real study under mpirun: 2 variants x 2 seeds of studies/tiny.yaml on mnist1d (on 2 ranks
rather than its 4: a launch's cost is mostly its ranks' start-up), stopped by Ctrl-C during its
first run, continued (that run resumes from its checkpoint), reported, and skipped entirely the
third time.

No race with the clock: the first sweep's runs are unbounded (train.steps=UNBOUNDED), so Ctrl-C
lands while the first run trains, whenever it comes; the continuing sweep gives them an end 40
steps past the step that run stopped at (tiny.yaml's lr schedule is in fixed steps, so a resume may
change train.steps)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.faults import UNBOUNDED, kill_all
from tests.helpers import ROOT

pytestmark = pytest.mark.mpi

SHIPPED = ROOT / "studies" / "tiny.yaml"


@pytest.fixture
def tiny(tmp_path):
    """studies/tiny.yaml on 2 ranks: the all-reduce run 1 x 2, codistillation 2 x 1."""
    text = SHIPPED.read_text()
    assert "\nranks: 4\n" in text
    study = tmp_path / "tiny.yaml"
    study.write_text(text.replace("\nranks: 4\n", "\nranks: 2\n"))
    return str(study)


def sweep(tiny, study_dir, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "hvcodistill.sweep", tiny, "--dir", str(study_dir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tiny_study_stops_resumes_reports_and_skips(tmp_path, tiny):
    study_dir = tmp_path / "tiny"
    # 1. Ctrl-C once the first run is training: its ranks write a checkpoint, the sweep exits 75.
    first = study_dir / "allreduce" / "seed_0"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hvcodistill.sweep",
            tiny,
            "--dir",
            str(study_dir),
            "--set",
            f"train.steps={UNBOUNDED}",
            "--set",
            "run.checkpoint_every=0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            (first / "metrics.jsonl").exists() and (first / "metrics.jsonl").read_text().strip()
        ):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the first run did not start training in 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:  # nothing is left if it went as it should; an unbounded run must not linger
        if proc.poll() is None:
            proc.kill()
        kill_all(first)
    assert proc.returncode == 75, out
    assert (
        "the running ranks write a checkpoint and stop" in out
        and "run the same command to continue" in out
    )
    stops = list((first / "checkpoints").glob("model_0/step_*.pt"))
    assert not (first / "summary.json").exists() and len(stops) == 1, out
    assert not (study_dir / "allreduce" / "seed_1").exists(), "the sweep went on after Ctrl-C"
    end = int(stops[0].stem.split("_")[1]) + 40
    settings = ["--set", f"train.steps={end}", "--set", "run.checkpoint_every=0"]

    # 2. The same command continues: the interrupted run resumes, the three others run.
    start = time.monotonic()
    done = sweep(tiny, study_dir, *settings)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"3 runs and a resumed one: {time.monotonic() - start:.1f}s")
    assert "run 1/4 allreduce/seed_0: resuming from step" in done.stdout
    assert done.stdout.count(": done in") == 4 and "4 of 4 runs finished, 0 failed" in done.stdout
    resumed = json.loads((first / "summary.json").read_text())
    assert resumed["resumed_from_step"] == end - 40 > 0 and resumed["steps"] == end
    fresh = json.loads((study_dir / "predictions_every=1" / "seed_1" / "summary.json").read_text())
    assert (
        fresh["topology"] == {"world_size": 2, "n_models": 2, "group_size": 1}
        and fresh["resumed_from_step"] == 0
    )
    assert (
        "hvcodistill: done in"
        in (study_dir / "predictions_every=1" / "seed_1" / "run.log").read_text()
    )

    # 3. The report: tables and figures of the 4 runs.
    rep = subprocess.run(
        [sys.executable, "-m", "hvcodistill.report", str(study_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rep.returncode == 0, rep.stderr
    md = (study_dir / "report.md").read_text()
    assert "**Runs: 4 of 4 finished.**" in md
    assert "| predictions_every=1 | 2 x 1 | predictions | 1 | 2/2 |" in md
    assert "| predictions_every=1 − allreduce | model val accuracy (pp) | 2 |" in md
    for png in ("accuracy.png", "tradeoff.png", "curves.png"):
        assert (study_dir / png).stat().st_size > 10_000, png

    # 4. Again: everything finished, nothing is started.
    again = sweep(tiny, study_dir, *settings, timeout=60)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4, (
        again.stdout
    )
    assert "differs" not in again.stdout
