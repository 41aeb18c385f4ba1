"""The training loop's own cost: the trainer with M = 1 against the plain Horovod loop
(hvcodistill/reference.py) of the same model, in paired rounds, for one or more revisions.

    .venv/bin/python scripts/loop_cost.py                          # the working tree
    .venv/bin/python scripts/loop_cost.py --rev 76937fa --rev .    # a revision against it

Every rank is measured from the training loader's first batch to its end, the same span in every
revision whatever its summary holds: wall time per step and process CPU time per step (all
threads; a loaded machine inflates it less than wall time), the mean over ranks. Each round runs,
for every revision, the plain loop and then the trainer, back to back; the ratios pair them round by
round (their median and range), as `python -m hvcodistill.bench` pairs them. A ratio of 1.00 is a
loop that costs nothing; below 1 the trainer is slower. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"plain": "hvcodistill.reference", "trainer": "hvcodistill.train"}
FIXED = (
    "train.epochs=0",
    "train.progress=false",
    "train.eval_every=0",
    "run.checkpoint_every=0",
    "codistill.n_models=1",
)


def probe(out: Path, module: str, argv: list[str]) -> None:
    """In a rank: run `module` with every loader it makes timed, from its first batch to its end;
    out/rank<R>.json lists them (the training loop's is the one of --steps batches)."""
    import runpy

    import hvcodistill.data as data

    make_loader, done = data.make_loader, []

    class Timed:
        def __init__(self, loader):
            self.it, self.steps, self.t0 = iter(loader), 0, None

        def __iter__(self):
            return self

        def __next__(self):
            if self.t0 is None:
                self.t0, self.c0 = time.perf_counter(), time.process_time()
            try:
                item = next(self.it)
            except StopIteration:
                done.append(
                    {
                        "steps": self.steps,
                        "wall_s": time.perf_counter() - self.t0,
                        "cpu_s": time.process_time() - self.c0,
                        "source": data.__file__,
                    }
                )
                rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
                (out / f"rank{rank}.json").write_text(json.dumps(done))
                raise
            self.steps += 1
            return item

    def timed(*args, **kwargs):
        return Timed(make_loader(*args, **kwargs))

    data.make_loader = timed  # before the module imports it
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def checkout(rev: str, tmp: Path) -> Path:
    """The source tree of `rev` ("." is the working tree itself)."""
    if rev == ".":
        return ROOT
    tree = tmp / f"rev-{rev}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_once(tree: Path, program: str, args, run_dir: Path) -> dict:
    """One launch; {wall_ms, cpu_ms}: per step, the mean over ranks."""
    sys.path.insert(0, str(ROOT))
    from hvcodistill.mpirun import mpirun_command

    run_dir.mkdir(parents=True)
    overrides = [f"train.steps={args.steps}", *FIXED, *args.overrides, f"run.dir={run_dir}"]
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", str(run_dir)]
    command += [PROGRAMS[program], "--config", str(tree / args.config), *overrides]
    cmd, env = mpirun_command(args.np, command)
    env = {**env, "PYTHONPATH": str(tree)}
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    ranks = [
        next((r for r in json.loads(p.read_text()) if r["steps"] == args.steps), None)
        for p in sorted(run_dir.glob("rank*.json"))
    ]
    ranks = [r for r in ranks if r is not None]
    if proc.returncode != 0 or len(ranks) != args.np:
        sys.exit(f"loop_cost: {program} in {tree} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    if any(not r["source"].startswith(str(tree)) for r in ranks):
        sys.exit(f"loop_cost: the ranks imported hvcodistill from {ranks[0]['source']}, not {tree}")
    return {
        "wall_ms": statistics.mean(r["wall_s"] / r["steps"] for r in ranks) * 1e3,
        "cpu_ms": statistics.mean(r["cpu_s"] / r["steps"] for r in ranks) * 1e3,
    }


def paired(plain: list[float], trainer: list[float]) -> str:
    ratios = sorted(p / t for p, t in zip(plain, trainer, strict=True))
    return f"{statistics.median(ratios):.3f}x ({ratios[0]:.3f}-{ratios[-1]:.3f})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rev", action="append", help="a git revision, or . (default: . only)")
    p.add_argument("-np", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--config", default="configs/digits_allreduce.yaml", help="in each revision")
    p.add_argument("--steps", type=int, default=3000, help="updates per run (default 3000)")
    p.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = p.parse_args()
    revs = args.rev or ["."]
    with tempfile.TemporaryDirectory(prefix="loop-cost-") as tmp:
        trees = {rev: checkout(rev, Path(tmp)) for rev in revs}
        got = {(rev, prog): [] for rev in revs for prog in PROGRAMS}
        for r in range(args.repeat):
            for rev, tree in trees.items():
                for prog in PROGRAMS:
                    m = run_once(tree, prog, args, Path(tmp) / f"run-{r}-{rev}-{prog}")
                    got[rev, prog].append(m)
                    print(
                        f"round {r + 1}/{args.repeat} {rev} {prog}: {m['wall_ms']:.3f} ms/step, "
                        f"CPU {m['cpu_ms']:.3f} ms/step",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        f"\n{args.np} ranks, {args.config}, {args.steps} steps, {args.repeat} rounds; "
        "per step, the mean over ranks, median of rounds"
    )
    print(f"{'revision':<12} {'program':<8} {'wall ms':>9} {'CPU ms':>9}")
    for (rev, prog), ms in got.items():
        wall = statistics.median(m["wall_ms"] for m in ms)
        cpu = statistics.median(m["cpu_ms"] for m in ms)
        print(f"{rev:<12} {prog:<8} {wall:>9.3f} {cpu:>9.3f}")
    print("\ntrainer (M = 1) / plain loop, paired by round (1.00: the loop costs nothing)")
    for rev in revs:
        plain, ours = got[rev, "plain"], got[rev, "trainer"]
        print(
            f"{rev:<12} speed {paired([m['wall_ms'] for m in plain], [m['wall_ms'] for m in ours])}"
            f"   CPU per step, plain/trainer "
            f"{paired([m['cpu_ms'] for m in plain], [m['cpu_ms'] for m in ours])}"
        )


if __name__ == "__main__":
    main()
