"""One atomic-write rule (hvcodistill/files.py): a write replaces the file whole or leaves the old
one, and config, summary and metrics go through it."""

import os
import subprocess

import pytest

from hvcodistill.config import load_config, save_config
from hvcodistill.files import write_atomic
from hvcodistill.training import checkpoint
from tests.helpers import ROOT

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_that_fails_leaves_nothing(tmp_path):
    (tmp_path / "summary.json").mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        write_atomic(tmp_path / "summary.json", b"{}")
    assert [q.name for q in tmp_path.iterdir()] == ["summary.json"]


def test_config_summary_and_metrics_use_the_atomic_rule(tmp_path, monkeypatch):
    from hvcodistill import config as config_module
    from hvcodistill import files
    from hvcodistill.training import metrics

    calls = []
    real = files.write_atomic

    def spy(path, data):
        calls.append(path.name)
        real(path, data)

    monkeypatch.setattr(files, "write_atomic", spy)
    monkeypatch.setattr(metrics, "write_atomic", spy)
    monkeypatch.setattr(checkpoint, "write_atomic", spy)
    monkeypatch.setattr(config_module, "write_atomic", spy)
    save_config(load_config(CONFIG), tmp_path / "config.yaml")
    metrics.write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert calls == ["config.yaml", "summary.json"]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        write_atomic(disk / "c.pt", b"old")
        with pytest.raises(OSError) as e:
            write_atomic(disk / "c.pt", b"x" * 200_000)
        assert e.value.errno == 28  # ENOSPC
        assert (disk / "c.pt").read_bytes() == b"old" and [q.name for q in disk.iterdir()] == [
            "c.pt"
        ]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
