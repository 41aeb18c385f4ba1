"""Bad input under real ranks: only what the MPI path adds to the in-process checks (config values
and files: tests/unit/test_config.py; data files: test_datasets.py; the GPU rule: test_setup.py).
A bad value every rank meets is agreed and said once; a data file broken on one rank only stops
every rank at load, naming that rank; an image that is no image, met in a batch by a DataLoader
worker, ends the whole job; GPUs asked through the launcher but not seen stop the job
before it trains. Each is one line, exit 2, no traceback, no hang."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, one_line_exit

pytestmark = pytest.mark.mpi

DIGITS = str(ROOT / "configs" / "digits_allreduce.yaml")  # one model over the ranks
QUICK = [
    "train.epochs=0",
    "train.steps=2",
    "train.eval_every=0",
    "train.progress=false",
    "train.log_every=1",
]


# The trainer's CLI with "{rank}" in an argument replaced by the rank, as node-local copies of data
# give each rank its own data.path (tests/mpi/per_rank.py does the same, but as a script without a
# __main__ guard, which a DataLoader worker imports again and so starts MPI in the worker).
PER_RANK = (
    "import os, sys; from hvcodistill.train import main; "
    "rank = os.environ['OMPI_COMM_WORLD_RANK']; "
    "sys.exit(main([a.replace('{rank}', rank) for a in sys.argv[1:]]))"
)


def train(ranks, tmp_path, *overrides, per_rank=False):
    """Two ranks of the trainer's CLI; per_rank: "{rank}" in an override is each rank's own."""
    entry = ["-c", PER_RANK] if per_rank else ["-m", "hvcodistill.train"]
    args = [*entry, "--config", DIGITS, *QUICK, f"run.dir={tmp_path / 'run'}", *overrides]
    return ranks(2, args, timeout=180, check=False)


def test_a_bad_value_every_rank_meets_is_said_once(ranks, tmp_path):
    """data.workers=100000000 once hung: every rank refuses it at load, they agree, one says so."""
    line = one_line_exit(train(ranks, tmp_path, "data.workers=100000000"), 2, "data.workers")
    assert "(rank" not in line, line  # no rank named: every rank found it


def test_a_data_file_broken_on_one_rank_stops_every_rank_at_load(ranks, tmp_path):
    """An .npz holding NaN once trained to exit 0. Here only rank 1's copy (node-local data) holds
    it: rank 0 read a good file, yet every rank stops before training, and the line names rank 1
    and its file."""
    for rank in (0, 1):
        x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        if rank == 1:
            x[5, 2] = np.nan
        np.savez(
            tmp_path / f"data{rank}.npz",
            x_train=x,
            y_train=np.arange(64) % 3,
            x_val=np.ones((8, 4)),
            y_val=np.arange(8) % 3,
        )
    proc = train(
        ranks,
        tmp_path,
        "data.name=npz",
        f"data.path={tmp_path}/data{{rank}}.npz",
        "train.batch_size=8",
        per_rank=True,
    )
    one_line_exit(proc, 2, "(rank 1)", f"{tmp_path}/data1.npz", "'x_train'", "non-finite")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_image_that_is_no_image_ends_the_job_from_a_dataloader_worker(ranks, tmp_path):
    """Found at its first use, in a batch (checking every image at start-up would read all of
    ImageNet on every rank), by the rank's DataLoader worker: one line naming the file, exit 2,
    through the lone-error path (MPI_Abort). One rank: with two, the rank left waiting in the
    all-reduce is taken down by mpirun, whose teardown under load is not this test's subject."""
    root = tmp_path / "images0"
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
                path = root / split / label / f"{i}.png"
                Image.fromarray(pixels).save(path)
                if split == "train":
                    path.write_bytes(b"this is not a PNG\n".ljust(path.stat().st_size, b"."))
    args = ["-m", "hvcodistill.train", "--config", DIGITS, *QUICK, f"run.dir={tmp_path / 'run'}"]
    proc = ranks(
        1,
        [*args, "data.name=imagenet", f"data.path={root}", "train.batch_size=2",
         "model.hidden=[4]", "data.workers=1", "train.device=cpu"],
        timeout=180,
        check=False,
    )  # fmt: skip
    line = one_line_exit(proc, 2, "(rank 0)", str(root / "train"), "cannot be read as an image")
    assert "ConfigError" not in line and "DataLoader" not in line, line


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="torch sees a GPU here: the rule does not apply"
)
def test_gpus_asked_through_the_launcher_but_not_seen_stop_the_job(ranks, tmp_path, monkeypatch):
    """A job given GPUs (CUDA_VISIBLE_DEVICES, as a scheduler sets it) that torch cannot see does
    not quietly train on CPU; train.device=cpu, which lets it go ahead: tests/unit/test_setup.py."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    line = one_line_exit(train(ranks, tmp_path), 2, "CUDA_VISIBLE_DEVICES=0", "train.device=cpu")
    assert "(rank" not in line, line
    assert not (tmp_path / "run" / "summary.json").exists()
