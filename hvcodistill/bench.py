"""What codistillation costs: step time and bytes moved for one topology, three ways.

    make bench                                  (4 ranks, digits MLP)
    python -m hvcodistill.bench -np 4 --config configs/digits_codistill.yaml train.steps=400

Runs the same config with (1) alpha = 0 (no exchange: M independent all-reduce runs), (2) prediction
exchange every step, (3) weight exchange every 50 steps, and prints per-step time of the training
loop (setup and evaluation excluded), the ratio to (1), and the bytes each moved over peer_comm.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hvcodistill.launch import mpirun_command

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_codistill.yaml"
VARIANTS = (
    ("alpha=0 (no exchange)", ["codistill.alpha=0"]),
    ("predictions, k=1", ["codistill.mode=predictions", "codistill.every=1", "codistill.burn_in_steps=0"]),
    ("weights, k=50", ["codistill.mode=weights", "codistill.every=50", "codistill.burn_in_steps=0"]),
)


def run_variant(np: int, config: str, overrides: list[str], run_dir: Path) -> dict:
    cmd, env = mpirun_command(np, [sys.executable, "-m", "hvcodistill.train", "--config", config,
                                   *overrides, f"run.dir={run_dir}", "train.progress=false",
                                   "train.eval_every=0"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench: run with {' '.join(overrides)} exited {proc.returncode}")
    return json.loads((run_dir / "summary.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvcodistill.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", type=int, default=4)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is shown")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="applied to every variant (default: train.steps=400 train.epochs=0)")
    args = p.parse_args(argv)
    common = args.overrides or ["train.epochs=0", "train.steps=400"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hvcodistill-bench-") as tmp:
        for i, (name, variant) in enumerate(VARIANTS):
            # the run with the median step time of --repeat runs: one noisy run says little
            runs = sorted((run_variant(args.np, args.config, [*common, *variant], Path(tmp) / f"{i}-{r}")
                           for r in range(args.repeat)), key=lambda s: s["timing"]["step_s"])
            rows.append((name, runs[len(runs) // 2]))
    base = rows[0][1]["timing"]["step_s"]
    t = rows[0][1]["topology"]
    print(f"topology: W={t['world_size']} M={t['n_models']} G={t['group_size']}; "
          f"{rows[0][1]['steps']} steps, median of {args.repeat} runs; config {args.config} {' '.join(common)}")
    print(f"{'variant':<24}{'step ms':>10}{'x alpha=0':>11}{'exchange ms/step':>18}"
          f"{'exchanges':>11}{'bytes/exchange/rank':>21}{'MB total':>10}")
    for name, s in rows:
        tm = s["timing"]
        per = s["exchanged_bytes"] / s["exchanges"] / t["world_size"] if s["exchanges"] else 0
        print(f"{name:<24}{tm['step_s'] * 1e3:>10.3f}{tm['step_s'] / base:>11.2f}"
              f"{tm['exchange_s'] / s['steps'] * 1e3:>18.3f}{s['exchanges']:>11}{per:>21.0f}"
              f"{s['exchanged_bytes'] / 1e6:>10.2f}")
    print(f"(bytes/exchange/rank: what one rank receives from its {t['n_models'] - 1} peer(s) per exchange)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
