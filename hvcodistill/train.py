"""Train M models at once with codistillation; M = 1 is the plain all-reduce baseline.

    python -m hvcodistill.train --config configs/digits_codistill.yaml [dotted.key=value ...]

Launch under mpirun, srun or horovodrun: every rank runs this. It reads the config, builds the
trainer, trains, finishes, and turns an error into its line and exit code (hvcodistill/errors.py):
0 done, 2 bad input, 3 data mismatch, 4 NaN/Inf, 74 checkpoint write failed, 75 preempted,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every bad input
        self.exit(2, f"hvcodistill: error: {message} (see --help)\n")


def parse_args(argv):
    p = _Parser(
        prog="python -m hvcodistill.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        action="append",
        required=True,
        help="a YAML experiment file (configs/*.yaml), or a shipped config's name",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="dotted.key=value", help="e.g. codistill.every=10"
    )
    args = p.parse_args(argv)
    if len(args.config) > 1:
        p.error(f"--config given {len(args.config)} times ({', '.join(args.config)}); give one")
    args.config = args.config[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported here: the job's modules start MPI when imported, and DataLoader workers
    # (forkserver) import this module again, where MPI must not start.
    from hvcodistill.training import job

    return job.main(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
