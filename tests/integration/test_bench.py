"""The benchmark as a user runs it on this host: a small real run of every variant, the reference
loop and the ratio (bench.py without ranks: tests/unit/test_bench.py). Two ranks, the fewest the
benchmark takes (most of a launch is its ranks' start-up), and both data planes: ten launches."""

import subprocess
import sys

import pytest

from hvcodistill.bench import REFERENCE, TORCH_VARIANTS, VARIANTS
from tests.helpers import ROOT

pytestmark = pytest.mark.mpi


def test_small_local_bench_prints_every_variant(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvcodistill.bench",
            "-np",
            "2",
            "--backends",
            "horovod,torch",
            "--steps",
            "6",
            "--repeat",
            "1",
            "--json",
            str(tmp_path / "b.json"),
            "model.hidden=[64]",
            "data.synthetic_train_size=1024",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for v in (*VARIANTS, REFERENCE, *TORCH_VARIANTS):
        assert v.name in proc.stdout, proc.stdout
    assert "plain Horovod loop: " in proc.stdout and (tmp_path / "b.json").is_file()
    assert "all-reduce, torch / plain DDP loop: " in proc.stdout
    assert "torch / Horovod, speed: M=1 " in proc.stdout
