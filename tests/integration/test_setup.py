"""scripts/setup.sh stops with one clear line, exit 2, when a prerequisite is missing or a setting
is bad; a second run installs nothing."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bin_without(tmp_path, *missing):
    """A PATH holding the usual tools, minus `missing` (no mock: the script looks them up)."""
    b = tmp_path / "bin"
    b.mkdir()
    for tool in (
        "bash",
        "dirname",
        "tr",
        "tail",
        "mkdir",
        "cat",
        "id",
        "python3",
        "g++",
        "cmake",
        "mpirun",
        "mpicc",
        "sed",
        "grep",
        "sha256sum",
        "cut",
    ):
        path = shutil.which(tool)
        if path and tool not in missing:
            (b / tool).symlink_to(path)
    return str(b)


@pytest.mark.parametrize(
    "missing,extra,needle",
    [
        (("mpirun",), {}, "no mpirun"),
        (("mpicc",), {}, "no mpicc"),
        # the compiler builds Horovod only: the line names the set-up without it
        (("g++",), {}, "no C++ compiler (g++) on PATH: install g++ (Debian: apt-get install g++), "
         "or set up without Horovod: HVCODISTILL_HOROVOD=0"),
        ((), {"HVCODISTILL_HOROVOD": "no"}, "HVCODISTILL_HOROVOD must be 0 or 1, not no"),
    ],
)  # fmt: skip
def test_missing_prerequisite_is_one_line(tmp_path, missing, extra, needle):
    env = {
        "PATH": bin_without(tmp_path, *missing),
        "HOME": str(tmp_path),
        "HVCODISTILL_SKIP_APT": "1",
        "VENV": str(tmp_path / "venv"),
        **extra,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: error:") and needle in lines[0], (
        proc.stderr
    )
    assert not (tmp_path / "venv").exists()  # stopped before doing anything


def test_second_setup_is_a_no_op_that_verifies(tmp_path):
    """The venv this suite runs in was made by setup.sh: running it again installs nothing."""
    venv = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv"))
    if not (venv / "bin" / "horovodrun").exists():
        pytest.skip("not running inside a venv made by scripts/setup.sh")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")],
        env={**os.environ, "VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: ready:"), (
        proc.stdout
    )  # nothing installed
    assert "Horovod 0.28.1" in lines[0] and "PyTorch+MPI" in lines[0]
