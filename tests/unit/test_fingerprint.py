"""The data fingerprint (data/fingerprint.py) that ranks compare at start: the content, not the
place; an image folder's file list and sizes."""

import numpy as np

from hvcodistill.data import build_datasets
from hvcodistill.data.fingerprint import data_fingerprint


def write_npz(path, seed, n=64, shape=(1, 4, 4)):
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.normal(size=(n, *shape)).astype(np.float32),
        y_train=np.arange(n) % 3,
        x_val=rng.normal(size=(16, *shape)).astype(np.float32),
        y_val=np.arange(16) % 3,
    )
    return str(path)


def test_data_fingerprint_is_content_not_place(tmp_path):
    a = write_npz(tmp_path / "a.npz", 0)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    a2 = write_npz(copy / "a.npz", 0)
    b = write_npz(tmp_path / "b.npz", 1)  # same shapes and labels, other values
    fa, fa2, fb = (data_fingerprint(build_datasets("npz", path=p)) for p in (a, a2, b))
    assert fa == fa2 and fa != fb
    digits = data_fingerprint(build_datasets("digits"))
    assert digits == data_fingerprint(build_datasets("digits"))
    syn = {"shape": [1, 4, 4], "num_classes": 3, "train_size": 8, "val_size": 4}
    assert data_fingerprint(build_datasets("synthetic", seed=0, synthetic=syn)) != data_fingerprint(
        build_datasets("synthetic", seed=1, synthetic=syn)
    )


def test_data_fingerprint_of_an_image_folder_is_its_file_list_and_sizes(tmp_path):
    from PIL import Image

    def folder(root, side_of_last=8, name_of_last="1.png"):
        for split in ("train", "val"):
            for c in ("cat", "dog"):
                (root / split / c).mkdir(parents=True)
                for side, name in ((8, "0.png"), (side_of_last, name_of_last)):
                    pixels = np.random.default_rng(side).integers(
                        0, 255, (side, side, 3), dtype=np.uint8
                    )
                    Image.fromarray(pixels).save(root / split / c / name)
        return str(root)

    paths = [
        folder(tmp_path / "one"),
        folder(tmp_path / "copy"),
        folder(tmp_path / "size", side_of_last=16),
        folder(tmp_path / "name", name_of_last="2.png"),
    ]
    f = [data_fingerprint(build_datasets("imagenet", path=p)) for p in paths]
    assert f[0] == f[1] and len({f[0], f[2], f[3]}) == 3
