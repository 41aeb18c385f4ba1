"""Bad input as a new user gives it: each is one line naming the key or file, exit code 2, no
traceback and no hang; refused at load where it can be (config, .npz), at first use where it
cannot (an image file that is no image). Also the GPU rule: a job that asked for GPUs does not
quietly train on CPU."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hvcodistill.config import MAX_SEED, MAX_WORKERS, load_config
from hvcodistill.data import BatchPlan, build_datasets
from hvcodistill.errors import ConfigError
from hvcodistill.training.setup import gpu_request
from tests.conftest import ROOT

DIGITS = str(ROOT / "configs" / "digits_allreduce.yaml")
QUICK = [
    "train.epochs=0",
    "train.steps=2",
    "train.eval_every=0",
    "train.progress=false",
    "train.log_every=1",
]


def _err(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(str(path) if path else None, ["train.steps=5", *overrides])
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def train_1_rank(
    tmp_path, *overrides, config=DIGITS, env=None, timeout=120
) -> subprocess.CompletedProcess:
    """One rank, as `python -m hvcodistill.train` (an MPI singleton), run.dir under tmp_path."""
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "hvcodistill.train",
        "--config",
        config,
        *QUICK,
        f"run.dir={tmp_path / 'run'}",
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_exit_2(proc, *needles) -> str:
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hvcodistill")]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(ours) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in ours[0], ours[0]
    return ours[0]


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "item,key",
    [
        ("optim.lr_milestones=[1,a]", "optim.lr_milestones"),
        ("optim.lr_milestones=[.nan]", "optim.lr_milestones"),
        ("optim.lr_milestones=[true]", "optim.lr_milestones"),
        ("optim.wd_milestones=[.inf]", "optim.wd_milestones"),
        ("train.seed=100000000000000000000000", "train.seed"),
        ("train.seed=-1", "train.seed"),
        ("model.init_seed=9223372036854775808", "model.init_seed"),
        ("model.hidden=[true]", "model.hidden"),
        ("model.hidden=[64,.inf]", "model.hidden"),
        ("data.synthetic_shape=[3,false]", "data.synthetic_shape"),
        ("data.workers=100000000", "data.workers"),
        ("optim.lr=1" + "0" * 400, "optim.lr"),  # an int too large for a float
        ("optim.momentum=.nan", "optim.momentum"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(item, key):
    assert key in _err(item)


def test_non_finite_weight_decay_value_is_refused():
    # lr=.inf was refused, wd_values=[.inf] trained to a NaN loss: one rule for every number now
    assert "optim.wd_values" in _err("optim.wd_milestones=[1]", "optim.wd_values=[.inf]")
    assert "optim.wd_values" in _err("optim.wd_milestones=[1]", "optim.wd_values=[.nan]")
    assert "optim.lr" in _err("optim.lr=.inf")


def test_values_at_the_limits_are_taken():
    cfg = load_config(
        None,
        [
            "train.steps=5",
            f"train.seed={MAX_SEED}",
            f"data.workers={MAX_WORKERS}",
            "optim.lr_milestones=[0.5, 2]",
            "optim.wd_milestones=[1]",
            "optim.wd_values=[1e-5]",
            "model.hidden=[64, 32]",
        ],
    )
    assert cfg.train.seed == MAX_SEED and cfg.data.workers == MAX_WORKERS
    assert (
        cfg.optim.lr_milestones == [0.5, 2] and type(cfg.optim.lr_milestones[1]) is int
    )  # steps stay ints
    assert cfg.optim.wd_values == [1e-5] and cfg.model.hidden == [64, 32]
    # the largest seed gives a valid data order (the plan's seed product is taken modulo 2**64)
    plan = BatchPlan(
        n_samples=10,
        batch_size=2,
        group_size=1,
        group_rank=0,
        n_models=1,
        model_id=0,
        order="shared",
        seed=MAX_SEED,
    )
    assert len(plan.key(0)[1]) == 2


def test_seed_limit_is_what_torch_takes():
    torch.Generator().manual_seed(MAX_SEED + 8)  # + model id: still taken
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2**64)


# ----------------------------------------------------------------------------- config files
def test_non_utf8_config_file_names_the_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train:\n  steps: 5\n# caf\xe9\n".encode("latin-1"))
    msg = _err(path=p)
    assert str(p) in msg and "UTF-8" in msg


def test_config_path_that_is_a_directory_says_so(tmp_path):
    msg = _err(path=tmp_path)
    assert str(tmp_path) in msg and "directory" in msg and "not found" not in msg


def test_train_cli_bad_values_one_line_exit_2(tmp_path):
    """Through the CLI (the values above take the same path): data.workers hung, a non-UTF-8
    file exited 1 with a traceback."""
    assert_one_line_exit_2(
        train_1_rank(tmp_path, "data.workers=100000000", timeout=60), "data.workers"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: 2\n\xff\xfe\n")
    assert_one_line_exit_2(train_1_rank(tmp_path, config=str(bad), timeout=60), str(bad), "UTF-8")


def test_bench_missing_config_one_line_before_any_rank():
    proc = subprocess.run(
        [sys.executable, "-m", "hvcodistill.bench", "--config", "/nonexistent.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "hvcodistill.bench: error: config file /nonexistent.yaml not found"
    ]


# ----------------------------------------------------------------------------- data files
def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(6, 2, 5)),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_val": rng.normal(size=(3, 2, 5)),
        "y_val": np.array([2, 0, 1]),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def _npz_err(path) -> str:
    with pytest.raises(ConfigError) as e:
        build_datasets("npz", path=path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "array,value", [("x_train", np.nan), ("x_val", np.inf), ("x_train", -np.inf)]
)
def test_npz_non_finite_inputs_name_file_and_array(tmp_path, array, value):
    x = np.random.default_rng(1).normal(size=(6, 2, 5) if array == "x_train" else (3, 2, 5))
    x[1, 0, 3] = value
    path = _write_npz(tmp_path / "d.npz", **{array: x})
    msg = _npz_err(path)
    assert path in msg and f"'{array}'" in msg and "non-finite" in msg and "(1, 0, 3)" in msg


def test_npz_labels_outside_the_class_range(tmp_path):
    path = _write_npz(tmp_path / "d.npz", num_classes=np.array(3), y_val=np.array([0, 3, 1]))
    msg = _npz_err(path)
    assert path in msg and "'y_val'" in msg and "[0, 3)" in msg
    assert (
        build_datasets(
            "npz", path=_write_npz(tmp_path / "ok.npz", num_classes=np.array(5))
        ).num_classes
        == 5
    )
    assert "'num_classes'" in _npz_err(_write_npz(tmp_path / "n.npz", num_classes=np.array([3, 4])))
    assert "'y_train'" in _npz_err(
        _write_npz(tmp_path / "i.npz", y_train=np.array([0, 1, np.inf, 0, 1, 2]))
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_npz_empty_split(tmp_path, split):
    path = _write_npz(
        tmp_path / "d.npz", **{f"x_{split}": np.zeros((0, 2, 5)), f"y_{split}": np.zeros(0)}
    )
    assert f"'x_{split}'" in _npz_err(path) and "N > 0" in _npz_err(path)


def test_npz_path_that_is_a_directory_says_so(tmp_path):
    msg = _npz_err(str(tmp_path))
    assert "directory" in msg and "not found" not in msg


def test_train_cli_npz_with_nan_exits_2(tmp_path):
    """Today's report: an .npz holding NaN trained to exit 0."""
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    x[5, 2] = np.nan
    path = _write_npz(
        tmp_path / "nan.npz",
        x_train=x,
        y_train=np.arange(64) % 3,
        x_val=np.ones((8, 4)),
        y_val=np.arange(8) % 3,
    )
    assert_one_line_exit_2(
        train_1_rank(tmp_path, "data.name=npz", f"data.path={path}", "train.batch_size=8"),
        path,
        "'x_train'",
        "non-finite",
    )


@pytest.fixture
def image_folder_with_a_bad_file(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / label / "0.png")
    bad = root / "train" / "dog" / "0.png"
    bad.write_text("this is not a PNG\n")
    return root, bad


def test_image_that_is_not_an_image_names_the_file(image_folder_with_a_bad_file):
    root, bad = image_folder_with_a_bad_file
    spec = build_datasets("imagenet", path=str(root), seed=0)  # the layout is fine: lazy set
    assert spec.train[(0, [0])][0].shape == (1, 3, 224, 224)  # the good image
    with pytest.raises(ConfigError) as e:
        spec.train[(0, [0, 1])]
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_train_cli_image_that_is_not_an_image_exits_2(
    tmp_path, image_folder_with_a_bad_file, workers
):
    """Found at its first use, in a batch (checking every image at start-up would read all of
    ImageNet on every rank): one line naming the file, exit 2, also from a DataLoader worker."""
    root, bad = image_folder_with_a_bad_file
    proc = train_1_rank(
        tmp_path,
        "data.name=imagenet",
        f"data.path={root}",
        "train.batch_size=2",
        "model.hidden=[4]",
        f"data.workers={workers}",
        "train.device=cpu",
        timeout=180,
    )
    line = assert_one_line_exit_2(proc, str(bad), "cannot be read as an image")
    assert "ConfigError" not in line and "DataLoader" not in line, line


# ----------------------------------------------------------------------------- messages
def test_messages_name_keys_that_exist(tmp_path):
    for synthetic, key in (
        ({"shape": [3, 0]}, "data.synthetic_shape"),
        ({"num_classes": 1}, "data.synthetic_classes"),
        ({"train_size": 0}, "data.synthetic_train_size"),
        ({"val_size": 0}, "data.synthetic_val_size"),
        ({"shape": [1, 2], "num_classes": 3}, "data.synthetic_shape"),
    ):
        with pytest.raises(ConfigError) as e:
            build_datasets("synthetic", synthetic=synthetic)
        assert key in str(e.value) and "data.synthetic." not in str(e.value), str(e.value)
    (tmp_path / "cifar-10-batches-py").mkdir()  # there, but not the data set
    with pytest.raises(ConfigError) as e:
        build_datasets("cifar10", path=str(tmp_path))
    assert "cifar-10-batches-py" in str(e.value) and "download" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- the GPU rule
@pytest.mark.parametrize(
    "env,asked",
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
        ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),
        ({"SLURM_STEP_GPUS": "2"}, "SLURM_STEP_GPUS=2"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "SLURM_GPUS_PER_NODE=a100:4"),
        ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
        ({"GPU_DEVICE_ORDINAL": "1"}, "GPU_DEVICE_ORDINAL=1"),
    ],
)
def test_gpu_request_from_the_environment(env, asked):
    assert gpu_request(env) == asked


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="torch sees a GPU here: the rule does not apply"
)
def test_train_cli_gpu_asked_but_none_seen_exits_2(tmp_path):
    proc = train_1_rank(tmp_path, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert_one_line_exit_2(proc, "CUDA_VISIBLE_DEVICES=0", "train.device=cpu")
    assert not (tmp_path / "run" / "summary.json").exists()
    # train.device=cpu says so on purpose: the run goes ahead, with the largest seed as well
    proc = train_1_rank(
        tmp_path, "train.device=cpu", f"train.seed={MAX_SEED}", env={"CUDA_VISIBLE_DEVICES": "0"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").exists()


def test_imagenet_configs_ask_for_cuda():
    for path in sorted((ROOT / "configs").glob("imagenet*.yaml")):
        assert load_config(str(path)).train.device == "cuda", path.name


def test_launch_environment_drops_what_an_enclosing_mpi_process_left():
    """A Python process that imported mpi4py.MPI (a singleton MPI_Init) carries PMIX_*/OMPI_* at the
    C level into every child; an mpirun started with them exits 1 silently (seen when a sweep was
    started from such a process). The launcher drops them and keeps the user's MCA tuning."""
    import subprocess
    import sys

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
    import json

    from hvcodistill.mpirun import launch_environment

    polluted = json.loads(out.strip().splitlines()[-1])
    assert any(k.startswith("PMIX_") for k in polluted)  # what the singleton left
    clean = launch_environment({**polluted, "OMPI_MCA_btl_tcp_if_include": "eth0"})
    assert not [
        k
        for k in clean
        if k.startswith(("PMIX_", "ORTE_")) or k in ("OMPI_MCA_ess", "OMPI_MCA_pmix")
    ]
    assert clean["OMPI_MCA_btl_tcp_if_include"] == "eth0" and clean["PATH"] == polluted["PATH"]
