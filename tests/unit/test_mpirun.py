"""The local launcher (mpirun.py) without ranks: the environment it hands mpirun."""

import json
import subprocess
import sys

from hvcodistill.mpirun import launch_environment


def test_launch_environment_drops_what_an_enclosing_mpi_process_left():
    """A Python process that imported mpi4py.MPI (a singleton MPI_Init) carries PMIX_*/OMPI_* at the
    C level into every child; an mpirun started with them exits 1 silently (seen when a sweep was
    started from such a process). The launcher drops them and keeps the user's MCA tuning."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mpi4py import MPI; import subprocess, json, sys; "
            "env = dict(l.split('=', 1) for l in subprocess.run(['env'], capture_output=True, "
            "text=True).stdout.splitlines() if '=' in l); print(json.dumps(env))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    polluted = json.loads(out.strip().splitlines()[-1])
    assert any(k.startswith("PMIX_") for k in polluted)  # what the singleton left
    clean = launch_environment({**polluted, "OMPI_MCA_btl_tcp_if_include": "eth0"})
    assert not [
        k
        for k in clean
        if k.startswith(("PMIX_", "ORTE_")) or k in ("OMPI_MCA_ess", "OMPI_MCA_pmix")
    ]
    assert clean["OMPI_MCA_btl_tcp_if_include"] == "eth0" and clean["PATH"] == polluted["PATH"]
