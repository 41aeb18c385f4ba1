"""The package works from a regular install, not only from a checkout: `pip install` of a copy of
the checkout into a scratch venv outside it; the shipped configs, studies and sbatch templates
are then found inside that venv, and the demo runs from another directory.

The scratch venv reuses the installed torch, Horovod and mpi4py through a .pth line naming this
interpreter's site-packages. A plain path line does not run the editable install's own .pth
there, so `import hvcodistill` can only find the copy installed into the scratch venv."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import pytest

from hvcodistill import resources
from tests.helpers import ROOT

# What `pip install .` must not see of a working checkout (as in .dockerignore).
NOT_SOURCE = (".git", ".venv", "venv", "env", ".cache", "build", "dist", "*.egg-info", "runs")
NOT_SOURCE += ("__pycache__", "*.py[cod]", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.pt")
SBATCH = ("allreduce", "codistill", "sweep")
DIGITS = ("digits_codistill", "digits_codistill.yaml", "configs/digits_codistill.yaml")
QUIET = {"capture_output": True, "text": True}


class Install(NamedTuple):
    python: Path  # the scratch venv's interpreter
    env: dict  # a user's environment for it: nothing points back at the checkout
    work: Path  # an empty directory outside the checkout
    package: Path  # <venv>/lib/pythonX.Y/site-packages/hvcodistill

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(self.python), *args]
        return subprocess.run(argv, cwd=self.work, env=self.env, timeout=timeout, **QUIET)


def user_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    ours = Path(sys.executable).parent
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != ours]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env.update(VIRTUAL_ENV=str(venv), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Install:
    tmp = tmp_path_factory.mktemp("install")
    src, venv, work = tmp / "src", tmp / "venv", tmp / "work"
    # A copy, so the build's egg-info and build/ land there, not in the checkout.
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    reused = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_hvcodistill_reuse.pth").write_text("".join(p + "\n" for p in reused))
    env = user_env(venv)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    argv = [*pip, "--no-deps", "--no-build-isolation", str(src)]
    proc = subprocess.run(argv, cwd=tmp, env=env, timeout=300, **QUIET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(src)  # nothing can come from the source tree any more
    work.mkdir()
    return Install(python, env, work, site / "hvcodistill")


def test_checkout_links_name_the_shipped_folders():
    for kind in ("configs", "studies", "slurm"):
        assert resources.shipped(kind) == ROOT / kind, kind
        assert (ROOT / kind).resolve() == resources.PACKAGE / kind, kind
    assert resources.root() == ROOT
    by_name = resources.config_path("configs/digits_codistill.yaml")
    assert by_name.samefile(ROOT / "configs" / "digits_codistill.yaml")


def test_installed_package_finds_its_shipped_files(installed):
    code = """if True:
        import json, hvcodistill
        from hvcodistill import resources as r
        print(json.dumps({
            "package": hvcodistill.__file__, "root": str(r.root()),
            "names": {kind: r.names(kind) for kind in ("configs", "studies", "slurm")},
            "configs": [str(r.config_path(name)) for name in %r],
            "study": str(r.study_path("tiny")),
            "sbatch": [str(r.sbatch_path(name)) for name in %r]}))
        """ % (DIGITS, SBATCH)
    proc = installed.run("-c", code)
    assert proc.returncode == 0, proc.stderr
    found, package = json.loads(proc.stdout), installed.package
    assert Path(found["package"]).parent == package and Path(found["root"]) == package
    assert found["names"]["configs"] == resources.names("configs")
    assert found["names"]["studies"] == resources.names("studies")
    assert found["names"]["slurm"] == list(SBATCH)
    assert {Path(p) for p in found["configs"]} == {package / "configs" / "digits_codistill.yaml"}
    assert Path(found["study"]) == package / "studies" / "tiny.yaml"
    assert [Path(p) for p in found["sbatch"]] == [package / "slurm" / f"{n}.sbatch" for n in SBATCH]


def test_installed_package_takes_shipped_names(installed):
    """`--config NAME`, and a study by name whose `config: configs/...` is a shipped config."""
    code = """if True:
        from hvcodistill.config import load_config
        from hvcodistill.studies.spec import load_study
        cfg = load_config("digits_codistill")
        study = load_study("tiny", study_dir="tiny")
        print(cfg.data.name, study.runs[0].config)
        """
    proc = installed.run("-c", code)
    assert proc.returncode == 0, proc.stderr
    data, config = proc.stdout.split()
    assert data == "digits"
    assert Path(config) == installed.package / "configs" / "mnist1d_codistill.yaml"
    missing = installed.run("-c", "from hvcodistill.config import load_config; load_config('nope')")
    assert "config file nope not found" in missing.stderr, missing.stderr
    assert "digits_codistill" in missing.stderr, missing.stderr


@pytest.mark.mpi
def test_demo_runs_from_an_install(installed):
    short = ["train.epochs=3", "codistill.burn_in_steps=10"]
    proc = installed.run("-m", "hvcodistill.demo", "--run-dir", "runs/demo", *short, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((installed.work / "runs" / "demo" / "summary.json").read_text())
    assert summary["topology"]["n_models"] == 2 and len(summary["models"]) == 2
    assert "ensemble: val accuracy" in proc.stdout
