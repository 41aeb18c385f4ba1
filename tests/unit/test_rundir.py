"""run.dir (training/rundir.py) without MPI: entries of the wrong kind, the shared-directory
markers, and the lock that refuses a second job."""

import os
import socket
import subprocess
import sys

import pytest

from hvcodistill.errors import ConfigError
from hvcodistill.training import rundir


@pytest.mark.parametrize(
    "name,kind",
    [
        ("metrics.jsonl", "dir"),
        ("summary.json", "dir"),
        ("config.yaml", "dir"),
        ("model_1.pt", "dir"),
        ("checkpoints", "file"),
        ("tb", "file"),
        ("checkpoints/model_0", "file"),
        ("tb/model_1", "file"),
    ],
)
def test_run_dir_entries_of_the_wrong_kind(tmp_path, name, kind):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.mkdir() if kind == "dir" else p.write_text("x")
    with pytest.raises(ConfigError, match=f"run.dir entry {p} should be"):
        rundir.check_entries(tmp_path, 2)


def test_run_dir_itself_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        rundir.check_entries(tmp_path / "f", 2)
    rundir.check_entries(tmp_path / "absent", 2)


def test_markers_seen_and_missing(tmp_path):
    a = rundir.leave_marker(tmp_path, 0, "node-a", "tok")
    rundir.check_markers(tmp_path, {0: "node-a"}, "tok", "node-a")
    with pytest.raises(
        ConfigError, match=r"not one directory shared.*on node-a.*model 1.*on node-b"
    ):
        rundir.check_markers(tmp_path, {0: "node-a", 1: "node-b"}, "tok", "node-a")
    # a mark left by an earlier run (another token) does not count
    rundir.leave_marker(tmp_path, 1, "node-b", "old")
    with pytest.raises(ConfigError):
        rundir.check_markers(tmp_path, {0: "node-a", 1: "node-b"}, "tok", "node-a")
    rundir.remove_marker(a, tmp_path, last=False)
    (tmp_path / rundir.MARKERS / "model_1.node-b.old").unlink()
    rundir.remove_marker(None, tmp_path, last=True)
    assert list(tmp_path.iterdir()) == []


HOLD = """
import sys, time
from pathlib import Path
from hvcodistill.training.rundir import lock
held = lock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_run_dir_lock_refuses_a_second_job(tmp_path):
    run_dir = tmp_path / "a" / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as e:
            rundir.lock(run_dir)
        msg = str(e.value)
        assert msg.startswith(
            f"run.dir {run_dir} is in use by another job "
            f"(pid {holder.pid} on host {socket.gethostname()})"
        ), msg
        assert "\n" not in msg
        rundir.check_entries(run_dir, 2)  # the lock file is no entry of the wrong kind
    finally:
        holder.kill()
        holder.wait()
    held = rundir.lock(run_dir)  # the holder is gone: its lock went with it
    assert held.held and (run_dir / rundir.LOCK).read_text().split()[0] == str(os.getpid())
    held.release()
    assert not (run_dir / rundir.LOCK).exists() and run_dir.is_dir()


def test_run_dir_lock_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    held = rundir.lock(run_dir)
    with pytest.raises(ConfigError, match=f"pid {os.getpid()} "):
        rundir.lock(run_dir)
    held.release()
    held.release()  # twice is harmless
    assert not run_dir.exists()  # created by the lock, empty: left as it was
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        rundir.lock(tmp_path / "file")
    again = rundir.lock(tmp_path)  # an existing run.dir stays
    again.release()
    assert tmp_path.is_dir()
