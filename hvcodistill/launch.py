"""Start N ranks on this machine with mpirun, with the settings a laptop or CI box needs.

    python -m hvcodistill.launch -np 4 \\
        python -m hvcodistill.train --config configs/digits_codistill.yaml

- more ranks than cores: `--oversubscribe` and `OMPI_MCA_mpi_yield_when_idle=1`; without the latter
  Open MPI busy-polls, and ranks waiting in MPI take the cores from those computing;
- as root (containers, CI): `--allow-run-as-root`;
- one thread per rank for torch/OpenMP unless set, so ranks do not fight over cores.
On a cluster use srun or horovodrun instead (see slurm/ and README.md).
"""

from __future__ import annotations

import argparse
import os

from hvcodistill.mpirun import mpirun_command, run_forwarding_signals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hvcodistill.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-np", type=int, help="number of ranks")
    p.add_argument(
        "--supervise",
        action="store_true",
        help="the command is a whole mpirun command line: run it as given, with the same signal "
        "forwarding and reaping of the local ranks (hvcodistill.cluster runs mpirun this way)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command each rank runs")
    args = p.parse_args(argv)
    if not args.command:
        p.error("need a command")
    if args.supervise:
        if args.np is not None:
            p.error("--supervise takes the whole mpirun command line; -np goes in it")
        return run_forwarding_signals(args.command, dict(os.environ))
    if args.np is None or args.np < 1:
        p.error("need -np >= 1 and a command")
    cmd, env = mpirun_command(args.np, args.command)
    return run_forwarding_signals(cmd, env)


if __name__ == "__main__":
    raise SystemExit(main())
