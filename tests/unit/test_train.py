"""The train command without ranks: its arguments, and what importing it costs a worker."""

import subprocess
import sys

import pytest

from hvcodistill.train import parse_args


def test_entry_points_do_not_start_mpi_on_import():
    # DataLoader workers (forkserver) import the parent's __main__ module again: an MPI_Init
    # there fails the worker, and with it the run (data.workers > 0)
    code = (
        "import sys, hvcodistill.train, hvcodistill.reference; "
        "sys.exit(1 if 'mpi4py.MPI' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_config_is_required_once(capsys):
    for argv in ([], ["a.yaml"], ["--config", "a.yaml", "--config", "b.yaml"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hvcodistill: error:") and "--config" in err and "\n" not in err
    args = parse_args(["--config", "digits_codistill", "train.steps=3"])
    assert args.config == "digits_codistill" and args.overrides == ["train.steps=3"]
