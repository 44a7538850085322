"""Auxiliary outlier sources: the bundled set, .npy arrays, image folders, ImageNet batches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unleash_ood.data import bundled
from unleash_ood.data.auxiliary import check_aux, load_aux, padded_crops, read_imagenet_batch
from unleash_ood.errors import UserError


def imagenet_rows(n: int, side: int, offset: int) -> np.ndarray:
    """Rows in the downsampled-ImageNet layout; image i's red plane is constant offset + i."""
    planes = np.zeros((n, 3, side, side), np.uint8)
    planes[:, 0] = (offset + np.arange(n) % 200)[:, None, None]
    planes[:, 1] = 7
    return planes.reshape(n, -1)


def test_bundled_outliers_are_disjoint_from_every_ood_photo() -> None:
    used = set(bundled.PHOTOS_TEST) | set(bundled.PHOTOS_VAL)
    assert not used & set(bundled.PHOTOS_AUX)
    aux = load_aux("bundled", 28, 1)
    assert len(aux) == bundled.AUX_SET.size == 10_200
    assert aux.shape == (1, 28, 28)


def test_bundled_subset_is_seeded_and_converted_to_the_benchmark_format() -> None:
    a = load_aux("bundled", 32, 3, limit=500, seed=1)
    b = load_aux("bundled", 32, 3, limit=500, seed=1)
    c = load_aux("bundled", 32, 3, limit=500, seed=2)
    assert len(a) == 500 and a.shape == (3, 32, 32)
    assert (a.images == b.images).all() and not (a.images == c.images).all()


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npy_images_in_every_layout(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    array = {
        "nhw": grey,
        "nhwc": np.repeat(grey[..., None], 3, -1),
        "nchw": np.repeat(grey[:, None], 3, 1),
    }[layout]
    np.save(tmp_path / "aux.npy", array)
    aux = load_aux(str(tmp_path / "aux.npy"), 28, 1, limit=30, seed=0)
    assert len(aux) == 30 and aux.shape == (1, 28, 28)
    kept = np.sort(np.random.default_rng(0).permutation(40)[:30])
    np.testing.assert_array_equal(aux.images[:, 0].numpy(), grey[kept])


def test_npy_of_floats_is_refused_with_advice(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.zeros((4, 28, 28), np.float32))
    with pytest.raises(UserError, match="save them as uint8"):
        load_aux(str(tmp_path / "f.npy"), 28, 1)


def test_image_folder(tmp_path: Path) -> None:
    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    aux = load_aux(str(tmp_path), 28, 1, limit=4, seed=0)
    assert len(aux) == 4 and aux.shape == (1, 28, 28)


@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_imagenet_batches_stream_a_uniform_subset(tmp_path: Path, kind: str) -> None:
    for b, offset in ((1, 0), (2, 100)):
        rows = imagenet_rows(100, 8, offset)
        labels = list(range(1, 101))
        if kind == "pickle":
            with open(tmp_path / f"train_data_batch_{b}", "wb") as f:
                pickle.dump({"data": rows, "labels": labels, "mean": rows.mean(0)}, f)
        else:
            np.savez(tmp_path / f"train_data_batch_{b}.npz", data=rows, labels=labels)
    one = read_imagenet_batch(next(tmp_path.glob("train_data_batch_1*")))
    assert one.shape == (100, 3, 8, 8) and (one[:, 1] == 7).all() and one[5, 0, 0, 0] == 5
    aux = load_aux(str(tmp_path), 8, 3, limit=120, seed=3)
    red = aux.images[:, 0].amax((1, 2)).numpy()  # the crop may put padding at any corner
    assert len(aux) == 120 and len(set(red.tolist())) == 120
    assert (red < 100).any() and (red >= 100).any()  # drawn from both files
    again = load_aux(str(tmp_path), 8, 3, limit=120, seed=3)
    assert (again.images == aux.images).all()
    assert len(load_aux(str(tmp_path), 8, 3)) == 200


def test_imagenet_outliers_are_padded_random_crops_as_the_official_code_takes_them() -> None:
    # data/imagenet_oe.py: RandomCrop(32, padding=4) of each 64 x 64 image
    data = np.arange(2 * 3 * 64 * 64).reshape(2, 3, 64, 64).astype(np.uint8)
    crops = padded_crops(data, 32, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    dy, dx = (torch.randint(0, 64 + 8 - 32 + 1, (2,), generator=g) for _ in range(2))
    padded = np.pad(data, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(2):
        np.testing.assert_array_equal(
            crops[i], padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        )
    small = np.zeros((2, 3, 8, 8), np.uint8)
    assert padded_crops(small, 32, torch.Generator()) is small  # resized whole later


def test_imagenet_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class RunsShell:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(tmp_path / "train_data_batch_1", "wb") as f:
        pickle.dump({"data": RunsShell()}, f)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_aux(str(tmp_path), 8, 3)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: p, "neither image files nor ImageNet batch files"),
        (lambda p: (p / "a.txt").write_text("x") and p / "a.txt", "unknown outlier file type"),
        (lambda p: (p / "a.npy").write_bytes(b"not an array") and p / "a.npy", "not a readable"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path: Path, make, message: str) -> None:
    """check_aux refuses what load_aux could not read, and load_aux refuses it the same way."""
    source = str(make(tmp_path))
    with pytest.raises(UserError, match=message):
        check_aux(source)
    with pytest.raises(UserError, match=message):
        load_aux(source, 28, 1)


def test_check_aux_accepts_every_readable_source(tmp_path: Path) -> None:
    check_aux("bundled")
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8), np.uint8))
    check_aux(str(tmp_path / "a.npy"))
    (tmp_path / "batches").mkdir()
    np.savez(tmp_path / "batches" / "train_data_batch_1.npz", data=np.zeros((2, 12), np.uint8))
    check_aux(str(tmp_path / "batches"))
