"""The data sources by ``data.name``: in-memory arrays, synthetic data made on demand, image
folders read per sample, and token data (data/tokens.py). ``BUILDERS`` is the one table of names.

No MPI, no Horovod, no downloads.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hvcodistill.data.base import Batch, BatchDataset, DataSpec, mix_seed
from hvcodistill.data.tokens import text_datasets, token_datasets
from hvcodistill.errors import ConfigError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "shape": [3, 32, 32],
    "num_classes": 10,
    "train_size": 1024,
    "val_size": 256,
}
# the config key behind each, named in errors
SYNTHETIC_KEYS = {
    "shape": "data.synthetic_shape",
    "num_classes": "data.synthetic_classes",
    "train_size": "data.synthetic_train_size",
    "val_size": "data.synthetic_val_size",
}
DIGITS_VAL_SIZE = 360
# The canonical MNIST-1D (mnist1d's get_dataset_args(), less its download url): 5000 signals,
# 80% train. Fixed here, so a later package with other defaults cannot change the set silently.
MNIST1D_ARGS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


class TensorBatchDataset(BatchDataset):
    """In-memory tensors, no augmentation: a batch is one vectorised gather."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.float().contiguous(), y.long().contiguous()

    def __len__(self) -> int:
        return len(self.y)

    def fetch(self, epoch: int, indices: torch.Tensor) -> Batch:
        return self.x[indices], self.y[indices]


class SyntheticBatchDataset(BatchDataset):
    """Learnable random data made on demand: sample i = prototype[label] + N(0, 1) noise, with label
    and noise drawn from a generator seeded by (seed, split, i). Nothing is stored per sample, so
    an ImageNet-sized set costs no memory. prototype[c] is one N(0, 1) vector seeded by `seed`,
    circularly shifted by c * (numel // num_classes): nearly orthogonal across classes, yet one
    vector in memory and no per-class generation (1000 ImageNet-shaped prototypes: 600 MB)."""

    _STREAMS = {"prototype": 0, "train": 1, "val": 2}

    def __init__(
        self, *, shape: tuple[int, ...], num_classes: int, size: int, seed: int, split: str
    ) -> None:
        self.shape, self.num_classes, self.size, self.seed = shape, num_classes, size, seed
        self.stream = self._STREAMS[split]
        g = torch.Generator().manual_seed(mix_seed(seed, self._STREAMS["prototype"]))
        self._base = torch.randn(math.prod(shape), generator=g)
        self._shift = (
            len(self._base) // num_classes
        )  # >= 1: build_datasets checks numel >= num_classes

    def __len__(self) -> int:
        return self.size

    def prototype(self, label: int) -> torch.Tensor:
        return self._base.roll(label * self._shift).view(self.shape)

    def fetch(self, epoch: int, indices: torch.Tensor) -> Batch:
        x = torch.empty((len(indices), *self.shape))
        y = torch.empty(len(indices), dtype=torch.int64)
        for row, i in enumerate(indices.tolist()):
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, i))
            label = int(torch.randint(self.num_classes, (1,), generator=g))
            x[row].normal_(generator=g).add_(self.prototype(label))
            y[row] = label
        return x, y


class TransformBatchDataset(BatchDataset):
    """Wraps a per-sample torchvision dataset ``base[i] -> (tensor, label)`` whose transform draws
    from torch's global CPU generator. Each sample's transform runs with that generator seeded by
    (seed, epoch, i) and restored afterwards, so augmentation is reproducible and the caller's
    random stream is left untouched."""

    def __init__(self, base: Dataset, *, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def sample_path(self, i: int) -> str:
        """Sample i's file (ImageFolder), else its index, for errors."""
        samples = getattr(self.base, "samples", None)
        return repr(samples[i][0]) if samples else f"sample {i}"

    def fetch(self, epoch: int, indices: torch.Tensor) -> Batch:
        xs, ys = [], []
        for i in indices.tolist():
            with torch.random.fork_rng(devices=[]):
                # Seed only the CPU generator: torch.manual_seed would also reseed CUDA generators.
                torch.default_generator.manual_seed(mix_seed(self.seed, epoch, i))
                try:
                    x, y = self.base[i]
                except (OSError, ValueError) as e:  # PIL: not an image, truncated, unreadable
                    why = (
                        "PIL does not recognise its format"
                        if type(e).__name__ == "UnidentifiedImageError"
                        else str(e).splitlines()[0]
                        if str(e)
                        else type(e).__name__
                    )
                    raise ConfigError(
                        f"data.path: {self.sample_path(i)} cannot be read as an image: {why}"
                    ) from None
            xs.append(x)
            ys.append(int(y))
        return torch.stack(xs).float(), torch.tensor(ys, dtype=torch.int64)


def _tensor_spec(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int | None = None,
) -> DataSpec:
    """In-memory splits; num_classes defaults to the largest label + 1 over both."""
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_val.max())) + 1
    train = TensorBatchDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    val = TensorBatchDataset(torch.from_numpy(x_val), torch.from_numpy(y_val))
    return DataSpec(train, val, tuple(x_train.shape[1:]), num_classes)


def _digits() -> DataSpec:
    """scikit-learn's 8x8 digits (ships offline). The split is fixed, independent of the run seed,
    so every run is scored on the same 360 validation images."""
    data, target = _digits_arrays()
    order = np.random.default_rng(0).permutation(len(target))
    x = data[order].reshape(-1, 1, 8, 8) / 16.0
    y = target[order].astype(np.int64)
    n_train = len(y) - DIGITS_VAL_SIZE
    # Standardise in float64 with train statistics only, then cast: identical on every machine.
    x = ((x - x[:n_train].mean()) / x[:n_train].std()).astype(np.float32)
    return _tensor_spec(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(data (1797, 64) float64, target (1797,)) as sklearn.datasets.load_digits() gives them,
    read from the file scikit-learn ships, because importing sklearn.datasets is slow on every
    rank at every start. load_digits() where the file is not at
    `sklearn/datasets/data/digits.csv.gz` (tests/test_data.py compares the two)."""
    spec = find_spec("sklearn")  # locates the package without importing it
    path = (
        Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if spec and spec.origin
        else None
    )
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # slow (see above): only where the file is missing

        digits = load_digits()
        return digits.data, digits.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _mnist1d(cache_dir: str) -> DataSpec:
    """MNIST-1D (Greydanus 2020), the canonical 4000 train / 1000 validation signals of length 40,
    generated offline by the `mnist1d` package (its own loader would download a pickle: not used).
    The set is fixed (the package's seed 42), independent of the run seed. Not saturated: an MLP
    overfits the 4000 signals. Generating is slow, so the arrays are cached in `cache_dir`
    (data.path; default $HVCODISTILL_CACHE or ~/.cache/hvcodistill) keyed by the generator's
    arguments and version, written once under a lock, temp file + rename, so ranks starting
    together neither regenerate nor read a half-written file."""
    try:
        key = json.dumps({**MNIST1D_ARGS, "version": metadata.version("mnist1d")}, sort_keys=True)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            "data.name=mnist1d needs the mnist1d package: pip install mnist1d"
        ) from None
    folder = (
        cache_dir
        or os.environ.get("HVCODISTILL_CACHE")
        or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hvcodistill"
        )
    )
    path = os.path.join(folder, f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one rank generates, the others wait and read
            if not os.path.exists(path):
                data = _generate_mnist1d()
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    np.savez(
                        f,
                        x_train=data["x"],
                        y_train=data["y"],
                        x_val=data["x_test"],
                        y_val=data["y_test"],
                    )
                os.replace(tmp, path)
            with np.load(path) as archive:
                arrays = {k: archive[k] for k in NPZ_KEYS}
    except OSError as e:
        raise ConfigError(f"data.path: cannot keep the mnist1d cache in {folder!r}: {e}") from None
    # (N, 40) -> (N, 1, 40): one channel of length 40
    return _tensor_spec(
        arrays["x_train"][:, None].astype(np.float32),
        arrays["y_train"].astype(np.int64),
        arrays["x_val"][:, None].astype(np.float32),
        arrays["y_val"].astype(np.int64),
    )


def _generate_mnist1d() -> dict:
    from mnist1d.data import make_dataset  # imports scipy and matplotlib: only when generating
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global numpy and random generators: give the caller its own back
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(
            ObjectView({k: list(v) if isinstance(v, list) else v for k, v in MNIST1D_ARGS.items()})
        )
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _synthetic(cfg: Mapping[str, Any], seed: int) -> DataSpec:
    unknown = sorted(set(cfg) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"data.synthetic_*: build_datasets got unknown synthetic key(s) {unknown}; "
            f"allowed: {', '.join(SYNTHETIC_DEFAULTS)}"
        )
    cfg, key = {**SYNTHETIC_DEFAULTS, **cfg}, SYNTHETIC_KEYS
    if not isinstance(cfg["shape"], Sequence) or not cfg["shape"]:
        raise ConfigError(
            f"{key['shape']}: expected a list of positive integers, got {cfg['shape']!r}"
        )
    shape = tuple(_positive_int(d, key["shape"]) for d in cfg["shape"])
    num_classes = _positive_int(cfg["num_classes"], key["num_classes"], minimum=2)
    if math.prod(shape) < num_classes:
        raise ConfigError(
            f"{key['shape']}: {list(shape)} has fewer values than "
            f"{key['num_classes']}={num_classes}"
        )
    sizes = {
        split: _positive_int(cfg[f"{split}_size"], key[f"{split}_size"])
        for split in ("train", "val")
    }
    train, val = (
        SyntheticBatchDataset(
            shape=shape, num_classes=num_classes, size=sizes[split], seed=seed, split=split
        )
        for split in ("train", "val")
    )
    return DataSpec(train, val, shape, num_classes)


def _npz(path: str) -> DataSpec:
    if not path or not os.path.isfile(path):
        what = "is a directory, not an .npz file" if path and os.path.isdir(path) else "not found"
        raise ConfigError(f"data.path: npz file {path!r} {what}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.path: cannot read {path!r} as .npz: {e}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError(
            f"data.path: {path!r} is a single array, expected an .npz with {', '.join(NPZ_KEYS)}"
        )
    with archive:
        for key in NPZ_KEYS:
            if key not in archive.files:
                raise ConfigError(
                    f"data.path: {path!r} has no array {key!r} (needs {', '.join(NPZ_KEYS)})"
                )
        try:
            arrays = {
                key: archive[key] for key in (*NPZ_KEYS, "num_classes") if key in archive.files
            }
        except (OSError, ValueError) as e:  # e.g. object arrays, refused without pickle
            raise ConfigError(f"data.path: cannot read arrays from {path!r}: {e}") from None
    where = f"data.path: {path!r} array"
    num_classes = arrays.pop("num_classes", None)  # optional: else the largest label + 1
    if num_classes is not None:
        if num_classes.shape != () or num_classes.dtype.kind not in "iu" or num_classes < 2:
            raise ConfigError(
                f"{where} 'num_classes' must be one integer >= 2, got {num_classes!r}"
            )
        num_classes = int(num_classes)
    for split in ("train", "val"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or x.dtype.kind not in "biuf" or len(x) == 0:
            raise ConfigError(
                f"{where} 'x_{split}' must be numeric (N, ...) with N > 0, got {x.dtype} {x.shape}"
            )
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            # NaN or inf in the inputs trains to a NaN loss, or worse to a model that looks fine
            bad = np.argwhere(~np.isfinite(x))
            raise ConfigError(
                f"{where} 'x_{split}' holds {len(bad)} non-finite value(s) (NaN or inf), "
                f"the first at index {tuple(int(i) for i in bad[0])}"
            )
        if y.shape != (len(x),):
            raise ConfigError(
                f"{where} 'y_{split}' must have shape ({len(x)},) to match 'x_{split}', "
                f"got {y.shape}"
            )
        if (
            y.dtype.kind not in "biuf"
            or not np.isfinite(y).all()
            or (y < 0).any()
            or (y != np.round(y)).any()
        ):
            raise ConfigError(f"{where} 'y_{split}' must hold non-negative integer labels")
        if num_classes is not None and (y >= num_classes).any():
            raise ConfigError(
                f"{where} 'y_{split}' holds label {int(y.max())}, outside the class range "
                f"[0, {num_classes}) that array 'num_classes' gives"
            )
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x.astype(np.float32), y.astype(np.int64)
    if arrays["x_train"].shape[1:] != arrays["x_val"].shape[1:]:
        raise ConfigError(
            f"data.path: {path!r} array 'x_val' per-sample shape {arrays['x_val'].shape[1:]} "
            f"differs from 'x_train' {arrays['x_train'].shape[1:]}"
        )
    return _tensor_spec(*(arrays[key] for key in NPZ_KEYS), num_classes=num_classes)


def _cifar10(path: str, seed: int, augment: bool) -> DataSpec:
    from torchvision import datasets  # start-up time: image folders only
    from torchvision import transforms as T

    if not os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        raise ConfigError(
            f"data.path: {path!r} must contain cifar-10-batches-py/ (CIFAR-10 python version, "
            "downloaded beforehand; nothing is downloaded at run time)"
        )
    normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augmentation = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    try:
        train = datasets.CIFAR10(
            path, train=True, transform=T.Compose(augmentation + normalize), download=False
        )
        val = datasets.CIFAR10(path, train=False, transform=T.Compose(normalize), download=False)
    except (
        RuntimeError
    ):  # torchvision's "Dataset not found or corrupted" (its advice, download=True, is not ours)
        raise ConfigError(
            f"data.path: {os.path.join(path, 'cifar-10-batches-py')!r} is incomplete or corrupted "
            "(its md5 sums do not match): unpack cifar-10-python.tar.gz there again"
        ) from None
    return DataSpec(
        TransformBatchDataset(train, seed=seed),
        TransformBatchDataset(val, seed=seed),
        (3, 32, 32),
        10,
    )


def _imagenet(path: str, seed: int, augment: bool) -> DataSpec:
    from torchvision import datasets  # start-up time: image folders only
    from torchvision import transforms as T

    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise ConfigError(
            f"data.path: {path!r} must hold train/<class>/<image> and val/<class>/<image> "
            "(ImageFolder layout, same class folders in both)"
        )
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    center = [T.Resize(256), T.CenterCrop(224)]
    augmentation = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if augment else center
    try:
        train = datasets.ImageFolder(train_dir, transform=T.Compose(augmentation + normalize))
        val = datasets.ImageFolder(val_dir, transform=T.Compose(center + normalize))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or a class without images
        raise ConfigError(f"data.path: {path!r}: {e}") from None
    if train.classes != val.classes:
        raise ConfigError(
            f"data.path: {val_dir!r} class folders differ from {train_dir!r} "
            f"({len(val.classes)} vs {len(train.classes)} classes)"
        )
    return DataSpec(
        TransformBatchDataset(train, seed=seed),
        TransformBatchDataset(val, seed=seed),
        (3, 224, 224),
        len(train.classes),
    )


# data.name -> builder, called with build_datasets' keywords (each takes the ones it needs).
# The one list of data set names: DATA_NAMES is read from this table.
BUILDERS: dict[str, Callable[..., DataSpec]] = {
    "digits": lambda **_: _digits(),
    "mnist1d": lambda *, path, **_: _mnist1d(path),
    "synthetic": lambda *, synthetic, seed, **_: _synthetic(synthetic or {}, seed),
    "npz": lambda *, path, **_: _npz(path),
    "cifar10": lambda *, path, seed, augment, **_: _cifar10(path, seed, augment),
    "imagenet": lambda *, path, seed, augment, **_: _imagenet(path, seed, augment),
    "text": lambda *, path, seed, context, **_: text_datasets(path, context=context, seed=seed),
    "tokens": lambda *, path, seed, context, **_: token_datasets(path, context=context, seed=seed),
}
DATA_NAMES = tuple(BUILDERS)


def build_datasets(
    name: str,
    *,
    path: str = "",
    seed: int = 0,
    augment: bool = False,
    synthetic: Mapping[str, Any] | None = None,
    context: int = 64,
) -> DataSpec:
    """Train and validation sets by ``data.name``. ``seed`` drives synthetic data and augmentation;
    it must be the same on peers that share batches. ``augment`` applies to cifar10 and imagenet
    (the others are in-memory or synthetic and are never augmented). ``context``: the windows of
    token data (text, tokens: data/tokens.py)."""
    builder = BUILDERS.get(name)
    if builder is None:
        raise ConfigError(
            f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATA_NAMES)}"
        )
    return builder(path=path, seed=seed, augment=augment, synthetic=synthetic, context=context)


__all__ = [
    "BUILDERS",
    "DATA_NAMES",
    "SyntheticBatchDataset",
    "TensorBatchDataset",
    "TransformBatchDataset",
    "build_datasets",
]
