"""`python tests/mpi/per_rank.py ARGS`: the trainer's CLI with "{rank}" in ARGS replaced by this
rank's world rank, read from the launcher's environment, as node-local copies of data would give
each rank its own data.path (a test of what happens when those copies differ)."""

import os
import sys

from hvcodistill.train import main

rank = next(
    os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID") if v in os.environ
)
sys.exit(main([arg.replace("{rank}", rank) for arg in sys.argv[1:]]))
