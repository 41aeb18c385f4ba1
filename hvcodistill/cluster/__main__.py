"""Emulate a multi-node cluster on this machine (root): network namespaces joined by shaped links.

    python -m hvcodistill.cluster up --nodes 2 [--rate 1gbit] [--delay 100us] [--mtu 9000]
        [--name hvc] [--replace]
    python -m hvcodistill.cluster run -np 4 [--slots 2] [-x VAR[=VALUE]] -- COMMAND...
        e.g. run -np 4 -- .venv/bin/python -m hvcodistill.train \\
                 --config configs/digits_codistill.yaml
    python -m hvcodistill.cluster status [--name hvc]          (default: every cluster up)
    python -m hvcodistill.cluster shape --rate 100mbit [--delay 100us] [--name hvc]
    python -m hvcodistill.cluster down [--name hvc]

Rates: 100mbit, 1gbit, 10gbit, ... or none/unshaped; each node's link is shaped both ways.
A delay needs the kernel's netem qdisc. Bad input: one line and exit code 2; a failing system
command during up/shape: one line and exit code 1, with whatever up had made removed again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from hvcodistill.cluster import STATE_DIR, ClusterError, EmulatedCluster, clusters_up
from hvcodistill.errors import ConfigError

PROG = "python -m hvcodistill.cluster"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create the nodes, the switch and the shaped links")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument(
        "--rate",
        default=None,
        help="per-link rate each way: 100mbit, 1gbit, 10gbit, none (default)",
    )
    up.add_argument(
        "--delay", default=None, help="added one-way delay per link hop, e.g. 100us (needs netem)"
    )
    up.add_argument("--mtu", type=int, default=9000, help="link MTU (default 9000, jumbo frames)")
    up.add_argument("--replace", action="store_true", help="take down a cluster of that name first")
    shape = sub.add_parser("shape", help="change the rate/delay of a running cluster")
    shape.add_argument("--rate", required=True)
    shape.add_argument("--delay", default=None)
    sub.add_parser("down", help="remove what up created")
    sub.add_parser("status", help="what is up, its shaping and byte counters")
    run = sub.add_parser("run", help="mpirun on the cluster that is up (from node0)")
    run.add_argument("-np", type=int, required=True, help="number of ranks")
    run.add_argument(
        "--slots", type=int, default=None, help="ranks per node (default ceil(np / nodes))"
    )
    run.add_argument(
        "-x",
        dest="env",
        action="append",
        default=[],
        metavar="VAR[=VALUE]",
        help="also pass this environment variable to the ranks",
    )
    run.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- then the command every rank runs"
    )
    for cmd, sp in sub.choices.items():
        default = None if cmd == "status" else "hvc"  # status without --name: every cluster up
        sp.add_argument("--name", default=default, help="cluster name (default hvc)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not args.command:
            p.error("run needs a command after --")
    return args


def env_pairs(items: list[str]) -> dict:
    """-x VAR (value from here) or -x VAR=VALUE -> {VAR: VALUE}."""
    out = {}
    for item in items:
        var, eq, value = item.partition("=")
        if not eq and var not in os.environ:
            raise ConfigError(f"-x {var}: not set in this environment (use -x {var}=VALUE)")
        out[var] = value if eq else os.environ[var]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.cmd == "up":
            EmulatedCluster(
                args.nodes, name=args.name, rate=args.rate, delay=args.delay, mtu=args.mtu
            ).up(replace=args.replace)
        elif args.cmd == "down":
            EmulatedCluster(name=args.name).down()
        elif args.cmd == "status":
            names = [n for n in clusters_up() if args.name in (None, n)]
            if not names:
                print(
                    f"no cluster {'is' if args.name is None else repr(args.name) + ' is'} up "
                    f"(records in {STATE_DIR})"
                )
            for name in names:
                print(EmulatedCluster.attach(name).describe())
        elif args.cmd == "shape":
            cluster = EmulatedCluster.attach(args.name)
            cluster.shape(args.rate, args.delay)
            print(
                f"hvcodistill.cluster: {args.name!r} links now {args.rate}"
                f"{', delay ' + args.delay if args.delay else ''}",
                file=sys.stderr,
            )
        elif args.cmd == "run":
            cluster = EmulatedCluster.attach(args.name)
            cmd, env = cluster.mpirun_command(
                args.np, args.command, slots=args.slots, env=env_pairs(args.env)
            )
            return subprocess.call(cmd, env=env)
    except ConfigError as e:
        print(f"hvcodistill.cluster: error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"hvcodistill.cluster: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
