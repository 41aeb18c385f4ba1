"""The demo: a real codistillation run on CPU, 2 models x 2 ranks on scikit-learn's digits.

make demo            (python -m hvcodistill.demo [-np 4] [dotted.key=value ...])
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hvcodistill.mpirun import mpirun_command
from hvcodistill.resources import config_path

CONFIG = config_path("digits_codistill")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvcodistill.demo", description=__doc__)
    p.add_argument("-np", type=int, default=4, help="ranks (default 4: 2 models x 2 ranks)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = p.parse_args(argv)
    train = [sys.executable, "-m", "hvcodistill.train", "--config", str(CONFIG)]
    cmd, env = mpirun_command(args.np, [*train, f"run.dir={args.run_dir}", *args.overrides])
    if Path(args.run_dir).exists():
        # a demo starts fresh: left in place, the last run's final checkpoint would be resumed
        shutil.rmtree(args.run_dir)
    print(
        f"demo: {args.np} ranks, {CONFIG.name}: 2 models exchange predictions every step; "
        f"run directory {args.run_dir}",
        flush=True,
    )
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"demo: training exited with code {code}", file=sys.stderr)
        return code
    s = json.loads((Path(args.run_dir) / "summary.json").read_text())
    t = s["topology"]
    print(
        f"\n{t['n_models']} models x {t['group_size']} ranks, mode {s['mode']}, "
        f"every {s['every']} step(s), {s['steps']} steps in {s['wall_seconds']:.1f}s"
    )
    for m in s["models"]:
        print(
            f"  model {m['id']}: val accuracy {m['val_accuracy']:.4f}  val loss {m['val_loss']:.4f}"
        )
    print(f"  ensemble: val accuracy {s['ensemble_val_accuracy']:.4f}")
    print(f"  disagreement: {s['disagreement']:.4f} of validation samples")
    tm = s["timing"]
    print(
        f"  per rank, training loop {tm['loop_s']:.2f}s: compute {tm['compute_s']:.2f}s, "
        f"all-reduce wait {tm['allreduce_s']:.2f}s, exchange {tm['exchange_s']:.2f}s, "
        f"evaluation {tm['eval_s']:.2f}s, checkpoints {tm['checkpoint_s']:.2f}s, "
        f"data {tm['data_s']:.2f}s, other {tm['other_s']:.2f}s"
    )
    print(f"  exchanged: {s['exchanged_bytes'] / 1e6:.2f} MB")
    tensorboard = os.path.relpath(Path(sys.executable).parent / "tensorboard")
    print(f"\nlook at the run:  {tensorboard} --logdir {args.run_dir}/tb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
