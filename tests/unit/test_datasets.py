"""Datasets (data/datasets.py): fixed splits, bad files refused with one line naming the file and
the key (at load, or at first use for an image that is no image), and batches that are a pure
function of (seed, epoch, indices), also through a multi-worker DataLoader; MNIST-1D generated
once, cached for all ranks."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import hvcodistill.data.datasets as datasets
from hvcodistill.data import DATA_NAMES, build_datasets
from hvcodistill.data.datasets import _digits_arrays
from hvcodistill.errors import ConfigError


def _key(epoch, *indices):
    return epoch, torch.tensor(indices, dtype=torch.int64)


def test_digits_file_read_equals_load_digits():
    """The digits are read from scikit-learn's file without importing sklearn.datasets (start-up
    time); they must be exactly what load_digits() gives, dtypes included."""
    from sklearn.datasets import load_digits  # slow to import: this test only

    data, target = _digits_arrays()
    ref = load_digits()
    assert data.dtype == ref.data.dtype and target.dtype == ref.target.dtype
    assert np.array_equal(data, ref.data) and np.array_equal(target, ref.target)
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from hvcodistill.data import build_datasets; "
            "build_datasets('digits', seed=0); print('sklearn' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert imported == "False"


def test_digits_fixed_split():
    spec = build_datasets("digits", seed=1)
    assert (len(spec.train), len(spec.val)) == (1437, 360)
    assert spec.input_shape == (1, 8, 8) and spec.num_classes == 10
    x, y = spec.train[_key(0, *range(1437))]
    assert x.dtype == torch.float32 and x.shape == (1437, 1, 8, 8) and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2  # standardised on train
    assert set(y.tolist()) == set(range(10))
    other = build_datasets("digits", seed=2)  # the split ignores the run seed
    assert torch.equal(other.val.x, spec.val.x) and torch.equal(other.val.y, spec.val.y)


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(6, 2, 5)),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_val": rng.normal(size=(3, 2, 5)),
        "y_val": np.array([3, 0, 1]),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_round_trip(tmp_path):
    arrays = _write_npz(tmp_path / "d.npz")
    spec = build_datasets("npz", path=str(tmp_path / "d.npz"))
    assert spec.input_shape == (2, 5) and spec.num_classes == 4  # max label + 1 over both splits
    x, y = spec.train[_key(0, 4, 1)]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), arrays["x_train"][[4, 1]].astype(np.float32))
    assert y.tolist() == [1, 1]
    assert torch.equal(spec.val[_key(0, 0, 1, 2)][1], torch.tensor([3, 0, 1]))


def test_npz_errors_name_file_and_key(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(ConfigError, match="data.path.*nope.npz"):
        build_datasets("npz", path=str(missing))
    _write_npz(tmp_path / "d.npz", y_val=None)
    with pytest.raises(ConfigError, match="d.npz.*'y_val'"):
        build_datasets("npz", path=str(tmp_path / "d.npz"))
    _write_npz(tmp_path / "d.npz", y_train=np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="d.npz.*'y_train'"):
        build_datasets("npz", path=str(tmp_path / "d.npz"))
    _write_npz(tmp_path / "d.npz", y_val=np.array([0, -1, 1]))
    with pytest.raises(ConfigError, match="d.npz.*'y_val'.*non-negative"):
        build_datasets("npz", path=str(tmp_path / "d.npz"))


def _npz_at(path, **overrides) -> str:
    _write_npz(path, **overrides)
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
    path = _npz_at(tmp_path / "d.npz", **{array: x})
    msg = _npz_err(path)
    assert path in msg and f"'{array}'" in msg and "non-finite" in msg and "(1, 0, 3)" in msg


def test_npz_labels_outside_the_class_range(tmp_path):
    path = _npz_at(tmp_path / "d.npz", num_classes=np.array(3), y_val=np.array([0, 3, 1]))
    msg = _npz_err(path)
    assert path in msg and "'y_val'" in msg and "[0, 3)" in msg
    assert (
        build_datasets(
            "npz", path=_npz_at(tmp_path / "ok.npz", num_classes=np.array(5))
        ).num_classes
        == 5
    )
    assert "'num_classes'" in _npz_err(_npz_at(tmp_path / "n.npz", num_classes=np.array([3, 4])))
    assert "'y_train'" in _npz_err(
        _npz_at(tmp_path / "i.npz", y_train=np.array([0, 1, np.inf, 0, 1, 2]))
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_npz_empty_split(tmp_path, split):
    path = _npz_at(
        tmp_path / "d.npz", **{f"x_{split}": np.zeros((0, 2, 5)), f"y_{split}": np.zeros(0)}
    )
    assert f"'x_{split}'" in _npz_err(path) and "N > 0" in _npz_err(path)


def test_npz_path_that_is_a_directory_says_so(tmp_path):
    msg = _npz_err(str(tmp_path))
    assert "directory" in msg and "not found" not in msg


def test_unknown_name_and_missing_folders(tmp_path):
    with pytest.raises(ConfigError, match="data.name") as err:
        build_datasets("mnist")
    assert all(name in str(err.value) for name in DATA_NAMES)
    with pytest.raises(ConfigError, match="data.path.*cifar-10-batches-py"):
        build_datasets("cifar10", path=str(tmp_path))
    with pytest.raises(ConfigError, match="data.path.*train/<class>"):
        build_datasets("imagenet", path=str(tmp_path))
    with pytest.raises(ConfigError, match="data.synthetic"):
        build_datasets("synthetic", synthetic={"size": 3})


SMALL = {"shape": [3, 8, 8], "num_classes": 5, "train_size": 500, "val_size": 200}


def test_synthetic_is_a_pure_function_of_seed_split_index():
    spec = build_datasets("synthetic", seed=3, synthetic=SMALL)
    assert spec.input_shape == (3, 8, 8) and spec.num_classes == 5 and len(spec.train) == 500
    x, y = spec.train[_key(0, 7, 3, 499)]
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = build_datasets("synthetic", seed=3, synthetic=SMALL).train[_key(5, 7, 3, 499)]
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])  # rebuilt, any epoch: same data
    single = spec.train[_key(0, 3)]
    assert torch.equal(single[0][0], x[1])  # a sample does not depend on its batch-mates
    assert not torch.equal(spec.train[_key(0, 8, 3, 499)][0][0], x[0])
    assert not torch.equal(spec.val[_key(0, 7)][0][0], x[0])  # splits are distinct streams
    assert not torch.equal(
        build_datasets("synthetic", seed=4, synthetic=SMALL).train[_key(0, 7)][0][0], x[0]
    )
    _, labels = spec.train[_key(0, *range(500))]
    assert labels.min() >= 0 and labels.max() < 5 and len(labels.unique()) == 5
    with pytest.raises(IndexError):
        spec.train[_key(0, 500)]


def test_synthetic_is_learnable():
    spec = build_datasets("synthetic", seed=0, synthetic=SMALL)
    x_train, y_train = spec.train[_key(0, *range(500))]
    x_val, y_val = spec.val[_key(0, *range(200))]
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 8 * 8, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train.flatten(1)), y_train).backward()
        optimizer.step()
    accuracy = (model(x_val.flatten(1)).argmax(1) == y_val).float().mean().item()
    assert accuracy > 0.8  # chance is 0.2


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    return tmp_path


def test_imagefolder_augmentation_is_deterministic(image_folder):
    spec = build_datasets("imagenet", path=str(image_folder), seed=0, augment=True)
    assert spec.num_classes == 2 and spec.input_shape == (3, 224, 224) and len(spec.train) == 6
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x, y = spec.train[_key(0, 0, 4)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]
    rebuilt = build_datasets("imagenet", path=str(image_folder), seed=0, augment=True)
    assert torch.equal(rebuilt.train[_key(0, 0, 4)][0], x)  # e.g. another peer, or a resumed run
    assert not torch.equal(spec.train[_key(1, 0, 4)][0], x)  # a new epoch, new crops
    assert not torch.equal(
        build_datasets("imagenet", path=str(image_folder), seed=1, augment=True).train[
            _key(0, 0, 4)
        ][0],
        x,
    )
    val_x = spec.val[_key(0, 1)][0]
    assert torch.equal(spec.val[_key(7, 1)][0], val_x)  # validation is never augmented


def test_imagefolder_class_mismatch(image_folder):
    (image_folder / "val" / "dog").rename(image_folder / "val" / "bird")
    with pytest.raises(ConfigError, match="data.path.*val"):
        build_datasets("imagenet", path=str(image_folder))


@pytest.fixture
def image_folder_with_a_bad_file(tmp_path):
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


@pytest.mark.parametrize("name", ["synthetic", "imagenet"])
def test_dataloader_workers_match_direct_indexing(name, image_folder):
    spec = build_datasets(name, path=str(image_folder), seed=5, augment=True, synthetic=SMALL)
    keys = [
        _key(
            epoch,
            *(
                torch.randperm(len(spec.train), generator=torch.Generator().manual_seed(epoch))[
                    :4
                ].tolist()
            ),
        )
        for epoch in range(4)
    ]
    loader = DataLoader(spec.train, sampler=keys, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(keys)
    for key, (x, y) in zip(keys, batches):
        direct_x, direct_y = spec.train[key]
        assert torch.equal(x, direct_x) and torch.equal(y, direct_y)


# ---------------------------------------------------------------- MNIST-1D
needs_mnist1d = pytest.mark.skipif(
    importlib.util.find_spec("mnist1d") is None, reason="the mnist1d package is not installed"
)


@needs_mnist1d
def test_the_canonical_set_generated_once_then_read(tmp_path, monkeypatch):
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    spec = build_datasets("mnist1d", path=str(tmp_path), seed=5)
    assert np.random.random() == before, "generating must leave the caller's numpy generator alone"
    assert (len(spec.train), len(spec.val), spec.input_shape, spec.num_classes) == (
        4000,
        1000,
        (1, 40),
        10,
    )
    x, y = spec.train[(0, torch.arange(4000))]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp*"))

    def no_generation():
        raise AssertionError("regenerated although the cache holds the set")

    monkeypatch.setattr(datasets, "_generate_mnist1d", no_generation)
    again = build_datasets("mnist1d", path=str(tmp_path), seed=6)  # the split ignores the run seed
    assert torch.equal(again.val.x, spec.val.x) and torch.equal(again.train.y, spec.train.y)


@needs_mnist1d
def test_ranks_starting_together_read_one_whole_file(tmp_path):
    code = (
        "import sys, hashlib; from hvcodistill.data import build_datasets; "
        "s = build_datasets('mnist1d', path=sys.argv[1]); "
        "print(hashlib.sha256(s.train.x.numpy().tobytes() + s.val.y.numpy().tobytes()).hexdigest())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    digests = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(digests) == 1
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1 and not list(tmp_path.glob("*.tmp*"))
