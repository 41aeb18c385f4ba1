"""The sweep without MPI: a study file expanded into runs, and which runs a sweep starts, skips or
resumes (a fake launcher stands in for mpirun; integration/test_studies.py runs the real one)."""

import json
import textwrap

import pytest

from hvcodistill import sweep
from hvcodistill.errors import EXIT_FAILED, ConfigError
from hvcodistill.studies import runner
from hvcodistill.studies.spec import load_study, run_state, select_runs
from tests.helpers import ROOT

DIGITS = str(ROOT / "configs" / "digits_codistill.yaml")


def write_study(tmp_path, body: str, name: str = "study.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).replace("CONFIG", DIGITS))
    return path


GRID = """\
    name: g
    config: CONFIG
    ranks: 4
    seeds: [3, 7]
    baseline: allreduce
    grid: {codistill.temperature: [1.0, 2.0]}
    variants:
      allreduce:
        overrides: [codistill.n_models=1, codistill.alpha=0]
      predictions:
        overrides: [codistill.alpha=0.5]
        grid: {codistill.every: [1, 10, 100]}
"""


def test_expansion_is_the_product_of_axes_and_seeds(tmp_path):
    body = GRID.replace("baseline: allreduce", "baseline: allreduce_temperature=2.0")
    study = load_study(write_study(tmp_path, body), study_dir=tmp_path / "s")
    names = [v.name for v in study.variants]
    assert names == ["allreduce_temperature=1.0", "allreduce_temperature=2.0"] + [
        f"predictions_temperature={t}_every={k}" for t in ("1.0", "2.0") for k in (1, 10, 100)
    ]
    assert len(study.runs) == len(names) * 2 == 16
    assert [r.seed for r in study.runs[:4]] == [3, 7, 3, 7]  # seeds inner, variants in order
    run = study.runs[-1]
    assert run.name == "predictions_temperature=2.0_every=100/seed_7"
    assert run.dir == tmp_path / "s" / "predictions_temperature=2.0_every=100" / "seed_7"
    # study defaults first, then the variant, its grid point, and what makes the run this run
    assert run.overrides == (
        "run.checkpoint_every=1000",
        "codistill.alpha=0.5",
        "codistill.temperature=2.0",
        "codistill.every=100",
        "train.seed=7",
        f"run.dir={run.dir}",
        "run.resume=true",
    )
    point = study.variant("predictions_temperature=2.0_every=100")
    assert point.base == "predictions" and point.axes == {
        "codistill.temperature": 2.0,
        "codistill.every": 100,
    }
    assert study.baseline == "allreduce_temperature=2.0"


def test_baseline_and_selection(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"baseline 'allreduce' is not a variant \(the grid made allreduce_temperature",
    ):
        load_study(write_study(tmp_path, GRID))
    study = load_study(
        write_study(
            tmp_path,
            GRID.replace("baseline: allreduce", "baseline: allreduce_temperature=1.0").replace(
                "seeds: [3, 7]", "n_seeds: 3"
            ),
        )
    )
    assert study.seeds == [0, 1, 2] and study.dir.name == "g"
    chosen = select_runs(study, only=["predictions"], seeds=[1])
    assert [r.name for r in chosen] == [
        f"predictions_temperature={t}_every={k}/seed_1"
        for t in ("1.0", "2.0")
        for k in (1, 10, 100)
    ]
    with pytest.raises(ConfigError, match="--only: no variant nope"):
        select_runs(study, only=["nope"])


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "name: x\nconfig: CONFIG\nranks: 4\nvariants: {a: {}}\nsteps: 3\n",
            r"unknown key\(s\) \['steps'\]",
        ),
        ("name: x\nconfig: CONFIG\nvariants: {a: {}}\n", "variant a: no ranks"),
        (
            "name: x\nconfig: CONFIG\nranks: 4\nvariants: {a: {overides: []}}\n",
            "variant a: allowed keys",
        ),
        (
            "name: x\nconfig: CONFIG\nranks: 4\nvariants: {a: {overrides: [train.stpes=3]}}\n",
            r"run a/seed_0: unknown config key 'train.stpes'",
        ),
        (
            "name: x\nconfig: CONFIG\nranks: 3\nvariants: {a: {}}\n",
            "run a/seed_0: impossible topology: world size W=3",
        ),
        (
            "name: x\nconfig: nowhere.yaml\nranks: 4\nvariants: {a: {}}\n",
            "config file nowhere.yaml not found",
        ),
        ("name: x\nconfig: CONFIG\nranks: 4\nseeds: [1, 1]\nvariants: {a: {}}\n", "distinct"),
        (
            "name: x\nconfig: CONFIG\nranks: 4\nvariants: {a: {}}\ncompare: [[a, b]]\n",
            "compare 'b' is not a variant",
        ),
    ],
)
def test_bad_studies_fail_with_one_line(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path, body))


def test_bad_study_exits_2_naming_the_problem(tmp_path, capsys):
    path = write_study(tmp_path, "name: x\nconfig: CONFIG\nranks: 3\nvariants: {a: {}}\n")
    assert sweep.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "impossible topology" in err


@pytest.mark.parametrize("seeds", ["abc", "1,,2", "1.5"])
def test_bad_seeds_exit_2_naming_the_flag(tmp_path, capsys, seeds):
    path = write_study(tmp_path, SMALL)
    assert sweep.main([str(path), "--dry-run", "--seeds", seeds]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("hvcodistill.sweep: error: --seeds") and repr(seeds) in err


# ----------------------------------------------------------------------------- a fake launcher
class FakeLauncher:
    """Records what it was asked to run; 'trains' by writing summary.json, or fails."""

    def __init__(self, fail=()):
        self.stops, self.started, self.fail = 0, [], set(fail)

    def on_signal(self, *args):
        self.stops += 1

    def run(self, run, log):
        self.started.append((run.name, run.overrides, (run.dir / "metrics.jsonl").exists()))
        if run.name in self.fail:
            log.write_text(
                (log.read_text() if log.exists() else "")
                + "Traceback ...\nhvcodistill: error: boom\n"
            )
            return 1
        (run.dir / "summary.json").write_text(
            json.dumps(
                {
                    "models": [{"id": 0, "val_accuracy": 0.5}],
                    "ensemble_val_accuracy": 0.5,
                    "disagreement": 0.0,
                }
            )
        )
        return 0


SMALL = "name: small\nconfig: CONFIG\nranks: 4\nseeds: [0, 1, 2, 3]\nvariants: {a: {}}\n"


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path, capsys):
    study = load_study(write_study(tmp_path, SMALL), study_dir=tmp_path / "s")
    done, interrupted, started, new = study.runs
    for run in (done, interrupted, started):
        run.dir.mkdir(parents=True)
    (done.dir / "summary.json").write_text("{}")
    for model in (0, 1):  # both models wrote step 40, one also step 60: resume at 40
        ckpt = interrupted.dir / "checkpoints" / f"model_{model}"
        ckpt.mkdir(parents=True)
        for step in (20, 40) + ((60,) if model == 0 else ()):
            (ckpt / f"step_{step}.json").write_text("{}")
    (interrupted.dir / "metrics.jsonl").write_text('{"step": 40}\n')
    (started.dir / "metrics.jsonl").write_text('{"step": 10}\n')  # died before its first checkpoint
    (started.dir / "run.log").write_text("an earlier attempt\n")
    assert [run_state(r) for r in study.runs] == ["done", "interrupted", "started", "new"]

    fake = FakeLauncher()
    assert runner.run_locally(study, study.runs, fake) == 0
    out = capsys.readouterr().out
    assert [name for name, _, _ in fake.started] == [interrupted.name, started.name, new.name]
    assert "run 1/4 a/seed_0: finished earlier, skipped" in out
    assert "run 2/4 a/seed_1: resuming from step 40" in out
    assert (
        "run 3/4 a/seed_2: starting over" in out and "run 4/4 a/seed_3: starting on 4 ranks" in out
    )
    assert "about" in out and "left" in out  # an estimate once a run has finished
    resumed, fresh = fake.started[0], fake.started[1]
    assert "run.resume=true" in resumed[1] and resumed[2], "the resumed run keeps its metrics"
    assert not fresh[2], "a run that starts over drops its partial metrics"
    assert (started.dir / "run.log").read_text() == "an earlier attempt\n"  # the log is appended to
    assert json.loads((new.dir / "sweep_run.json").read_text())["exit_code"] == 0

    again = FakeLauncher()
    assert runner.run_locally(study, study.runs, again) == 0
    assert again.started == [] and capsys.readouterr().out.count("finished earlier, skipped") == 4


def test_a_failed_run_is_reported_and_the_study_goes_on(tmp_path, capsys):
    study = load_study(write_study(tmp_path, SMALL), study_dir=tmp_path / "s")
    fake = FakeLauncher(fail={"a/seed_1"})
    assert runner.run_locally(study, study.runs, fake) == EXIT_FAILED
    out = capsys.readouterr().out
    assert len(fake.started) == 4
    log = study.runs[1].dir / "run.log"
    assert (
        f"run 2/4 a/seed_1: FAILED (exit 1) after 0s: hvcodistill: error: boom · log {log}" in out
    )
    assert "3 of 4 runs finished, 1 failed" in out
    record = json.loads((study.runs[1].dir / "sweep_run.json").read_text())
    assert record["exit_code"] == 1 and record["error"] == "hvcodistill: error: boom"
    # next time only the failed run is started again
    retry = FakeLauncher()
    assert runner.run_locally(study, study.runs, retry) == 0
    assert [name for name, _, _ in retry.started] == ["a/seed_1"]


def test_a_changed_study_is_not_silently_reused(tmp_path, capsys):
    study = load_study(write_study(tmp_path, SMALL), study_dir=tmp_path / "s")
    run = study.runs[0]
    run.dir.mkdir(parents=True)
    (run.dir / "summary.json").write_text("{}")
    from hvcodistill.config import load_config, save_config

    save_config(
        load_config(run.config, list(run.overrides) + ["train.epochs=3"]), run.dir / "config.yaml"
    )
    runner.run_locally(study, study.runs[:1], FakeLauncher())
    assert "its config differs now: train.epochs" in capsys.readouterr().out


def test_dry_run_lists_and_writes_nothing(tmp_path, capsys):
    path = write_study(
        tmp_path, GRID.replace("baseline: allreduce", "baseline: allreduce_temperature=1.0")
    )
    assert (
        sweep.main([str(path), "--dir", str(tmp_path / "s"), "--dry-run", "--only", "allreduce"])
        == 0
    )
    out = capsys.readouterr().out
    assert "4 runs" in out and "allreduce_temperature=2.0/seed_7" in out and "new" in out
    assert not (tmp_path / "s").exists()


def test_slurm_run_list(tmp_path, capsys):
    study = load_study(write_study(tmp_path, SMALL), study_dir=tmp_path / "s")
    fields = runner.run_list_line(5, study.runs[2]).split("\t")
    assert (
        fields[:4] == ["5", "a", "2", "4"]
        and fields[4] == DIGITS
        and fields[5] == str(study.runs[2].dir)
    )
    assert "run.dir=" not in fields[6] and "train.seed=2" in fields[6].split(" ")
    (study.runs[0].dir).mkdir(parents=True)
    (study.runs[0].dir / "summary.json").write_text("{}")
    assert (
        runner.submit_slurm(
            study, study.runs, sbatch=sweep.SWEEP_SBATCH, sbatch_args="--partition=p", dry_run=True
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 to submit" in out and "--array=0-2 --ntasks=4" in out and "--partition=p" in out
    spaced = load_study(
        write_study(
            tmp_path, SMALL.replace("{a: {}}", '{a: {overrides: ["model.hidden=[32, 16]"]}}')
        )
    )
    with pytest.raises(ConfigError, match="whitespace"):
        runner.run_list_line(0, spaced.runs[0])
