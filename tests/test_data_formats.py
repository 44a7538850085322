"""Readers and CIFAR suites on small files written in the datasets' exact published formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from unleash_ood.cli import main
from unleash_ood.data import cifar, formats
from unleash_ood.data.registry import DATASETS, SUITES
from unleash_ood.errors import UserError
from unleash_ood.progress import decoding_bars

CIFAR10_NAMES = [b"airplane", b"automobile", *(f"class{i}".encode() for i in range(2, 10))]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test decodes into its own cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("UNLEASH_CACHE", str(folder))
    return folder


# --------------------------------------------------------------------------- writers


def fake_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def balanced_labels(per_class: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def dump(path: Path, obj: object, protocol: int = 4) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10_py(folder: Path, train: tuple, test: tuple, protocol: int = 4) -> None:
    """``cifar-10-batches-py``: five training batches, a test batch and ``batches.meta``."""
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(train[1])), 5)
    for i, idx in enumerate(chunks, start=1):
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": train[1][idx].tolist(),
            b"data": train[0][idx].reshape(-1, 3072),
            b"filenames": [f"img_{j}.png".encode() for j in idx],
        }
        dump(folder / f"data_batch_{i}", batch, protocol)
    dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test[1].tolist(),
            b"data": test[0].reshape(-1, 3072),
        },
        protocol,
    )
    dump(
        folder / "batches.meta",
        {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072},
        protocol,
    )


def write_cifar100_py(folder: Path, train: tuple, test: tuple) -> None:
    """``cifar-100-python``: ``train``, ``test`` with fine and coarse labels, and ``meta``."""
    folder.mkdir(parents=True)
    for name, (x, y) in (("train", train), ("test", test)):
        dump(
            folder / name,
            {
                b"filenames": [b"f.png"] * len(y),
                b"batch_label": name.encode(),
                b"fine_labels": y.tolist(),
                b"coarse_labels": (y // 5).tolist(),
                b"data": x.reshape(-1, 3072),
            },
        )
    dump(
        folder / "meta",
        {
            b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
        },
    )


def write_cifar_bin(path: Path, images: np.ndarray, labels: np.ndarray, label_bytes: int) -> None:
    """Binary records: CIFAR-10 has one label byte, CIFAR-100 coarse then fine."""
    label_cols = [labels // 5, labels][-label_bytes:]
    records = np.concatenate(
        [np.stack(label_cols, 1).astype(np.uint8), images.reshape(len(images), -1)], axis=1
    )
    path.write_bytes(records.tobytes())


def write_svhn(path: Path, images: np.ndarray, digits: np.ndarray) -> None:
    """SVHN stores X as (32, 32, 3, N) and the digit 0 as label 10."""
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
    scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": y})


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    data += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_pictures(
    folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 36), suffix: str = ".png"
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        paths.append(folder / f"img{i:03d}{suffix}")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def write_mnist(folder: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(5)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)


# --------------------------------------------------------------------------- a full data root

CIFAR10_TRAIN = (fake_images(200, 0), balanced_labels(20, 10, 0))
CIFAR10_TEST = (fake_images(50, 1), balanced_labels(5, 10, 1))
CIFAR100_TRAIN = (fake_images(1000, 2), balanced_labels(10, 100, 2))
CIFAR100_TEST = (fake_images(200, 3), balanced_labels(2, 100, 3))
FOLDERS = {
    "inaturalist": "iNaturalist/images",
    "sun": "SUN/images",
    "places365": "Places/images",
    "textures": "dtd/images/banded",
    "lsun": "LSUN/test",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset of the CIFAR suites, a few images each, in its published layout."""
    root = tmp_path_factory.mktemp("data")
    write_cifar10_py(root / "cifar-10-batches-py", CIFAR10_TRAIN, CIFAR10_TEST)
    write_cifar100_py(root / "cifar-100-python", CIFAR100_TRAIN, CIFAR100_TEST)
    for i, folder in enumerate(FOLDERS.values()):
        write_pictures(root / folder, 3, seed=10 + i, suffix=".jpg")
    write_svhn(root / "svhn/test_32x32.mat", fake_images(5, 4), np.arange(5))
    write_pictures(root / "tiny-imagenet-200/val/images", 4, seed=20, size=(64, 64))
    write_pictures(root / "tiny-imagenet-200/test/images", 6, seed=21, size=(64, 64))
    write_mnist(root / "mnist", 6, 4)
    return root


# --------------------------------------------------------------------------- CIFAR formats


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar10_pickles_round_trip(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_py(folder, CIFAR10_TRAIN, CIFAR10_TEST, protocol)
    for split, (x, y) in (("train", CIFAR10_TRAIN), ("test", CIFAR10_TEST)):
        images, labels = formats.read_cifar_split(folder, split)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert formats.read_cifar_class_names(folder)[:2] == ("airplane", "automobile")


def test_cifar100_pickles_use_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    write_cifar100_py(folder, CIFAR100_TRAIN, CIFAR100_TEST)
    images, labels = formats.read_cifar_split(folder, "test")
    np.testing.assert_array_equal(images, CIFAR100_TEST[0])
    np.testing.assert_array_equal(labels, CIFAR100_TEST[1])
    assert formats.read_cifar_class_names(folder)[99] == "class99"


@pytest.mark.parametrize(
    ("label_bytes", "train", "test", "meta"),
    [
        (1, [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin", "batches.meta.txt"),
        (2, ["train.bin"], "test.bin", "fine_label_names.txt"),
    ],
)
def test_cifar_binary_round_trip(
    tmp_path: Path, label_bytes: int, train: list[str], test: str, meta: str
) -> None:
    x, y = CIFAR10_TRAIN
    for name, idx in zip(train, np.array_split(np.arange(len(y)), len(train)), strict=True):
        write_cifar_bin(tmp_path / name, x[idx], y[idx], label_bytes)
    write_cifar_bin(tmp_path / test, *CIFAR10_TEST, label_bytes)
    (tmp_path / meta).write_text("apple\nbanana\n\n")
    images, labels = formats.read_cifar_split(tmp_path, "train")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(formats.read_cifar_split(tmp_path, "test")[1], CIFAR10_TEST[1])
    assert formats.read_cifar_class_names(tmp_path) == ("apple", "banana")


def test_truncated_cifar_binary_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "test_batch.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(UserError, match="3073-byte"):
        formats.read_cifar_split(tmp_path, "test")


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """``{"data": data, "labels": labels}`` as Python 2's cPickle wrote CIFAR (protocol 2).

    Python 3 cannot write this: Python 2 strings are BINSTRING opcodes, and numpy's globals
    are named ``numpy.core.multiarray``.
    """

    def string(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    dtype = b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
    dtype += b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b")
    array += b"\x87R(K\x01" + struct.pack("<BiBi", 0x4A, data.shape[0], 0x4A, data.shape[1])
    array += b"\x86" + dtype + b"\x89" + string(data.tobytes()) + b"tb"
    items = b"".join(b"J" + struct.pack("<i", y) for y in labels)
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + b"](" + items + b"eu."


def test_python2_cifar_pickle_loads(tmp_path: Path) -> None:
    x, y = CIFAR10_TEST
    (tmp_path / "test_batch").write_bytes(py2_pickle(x.reshape(-1, 3072), y.tolist()))
    images, labels = formats.read_cifar_split(tmp_path, "test")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    dump(folder / "test_batch", {b"data": RunsShell(marker), b"labels": [0]})
    with pytest.raises(UserError, match=r"refusing to unpickle .*system"):
        formats.read_cifar_split(folder, "test")
    assert not marker.exists()


def test_pickle_of_arbitrary_class_is_refused(tmp_path: Path) -> None:
    dump(tmp_path / "p", {b"x": Path("/etc")})
    with pytest.raises(UserError, match="refusing to unpickle pathlib"):
        formats.load_pickle(tmp_path / "p")


# --------------------------------------------------------------------------- SVHN and IDX


def test_svhn_mat_shapes_and_label_10_is_digit_0(tmp_path: Path) -> None:
    x = fake_images(10, 7)
    write_svhn(tmp_path / "test_32x32.mat", x, np.arange(10))
    images, labels = formats.read_svhn_mat(tmp_path / "test_32x32.mat")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, np.arange(10))


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_plain_and_gzipped(tmp_path: Path, gz: bool) -> None:
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    write_idx(tmp_path / "images-idx3-ubyte", array, gz=gz)
    out = formats.read_idx(tmp_path / "images-idx3-ubyte")
    assert out.shape == (7, 28, 28) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_wider_types_come_back_native_endian(tmp_path: Path) -> None:
    array = np.array([[1, -2], [300, 70000]], dtype=">i4")
    header = struct.pack(">BBBBII", 0, 0, 0x0C, 2, 2, 2)
    (tmp_path / "x.idx").write_bytes(header + array.tobytes())
    out = formats.read_idx(tmp_path / "x.idx")
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"PK\x03\x04" + b"\0" * 20)
    with pytest.raises(UserError, match="magic"):
        formats.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 28, 28)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(UserError, match="does not match"):
        formats.read_idx(tmp_path / "short")


# --------------------------------------------------------------------------- image folders


def test_image_folder_recursive_sorted_mixed_formats(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    write_pictures(folder / "b", 2, seed=0, size=(32, 32))
    write_pictures(folder / "a", 1, seed=1, size=(32, 32), suffix=".JPEG")
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "a" / "._img000.png").write_bytes(b"macOS resource fork")
    images = formats.load_image_folder(folder, 32, 3)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    first_png = np.asarray(Image.open(folder / "b" / "img000.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(images[1].numpy(), first_png)  # a/ sorts before b/


def test_symlinked_folders_are_walked_once(tmp_path: Path) -> None:
    """A link back up the tree (a cycle) and a second link to one folder add no image twice;
    os.walk alone followed the cycle until the path grew too long, counting each image ~40
    times."""
    folder = tmp_path / "pics"
    write_pictures(folder / "a", 2, seed=0, size=(8, 8))
    (folder / "a" / "up").symlink_to("..", target_is_directory=True)
    (folder / "again").symlink_to("a", target_is_directory=True)
    assert [p.name for p in formats.list_images(folder)] == ["img000.png", "img001.png"]


def test_filesystem_root_is_not_an_image_folder() -> None:
    with pytest.raises(UserError, match="filesystem root; name the folder"):
        next(formats.iter_images(Path("/")))


def test_image_folder_keeps_aspect_and_crops_the_centre(tmp_path: Path) -> None:
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:40] = (0, 255, 0)
    pixels[:, 40:] = (0, 0, 255)
    (tmp_path / "wide").mkdir()
    Image.fromarray(pixels).save(tmp_path / "wide" / "x.png")
    image = formats.load_image_folder(tmp_path / "wide", 32, 3)[0]
    assert image.shape == (3, 32, 32)
    assert (image[1] == 255).all() and (image[0] == 0).all() and (image[2] == 0).all()
    grey = formats.load_image_folder(tmp_path / "wide", 16, 1)
    assert grey.shape == (1, 1, 16, 16)


def test_decoding_bars_follow_no_progress(
    tmp_path: Path, capsys, fmnist_dir, tiny_checkpoint
) -> None:
    """A folder is decoded where its dataset is first read, below any progress flag: a
    command's --no-progress reaches it through decoding_bars, and only within the command."""
    write_pictures(tmp_path / "shown", 2, seed=0)
    formats.load_image_folder(tmp_path / "shown", 32, 3)
    assert "decoding" in capsys.readouterr().err
    write_pictures(tmp_path / "outliers", 64, seed=1)
    argv = ["finetune", "--from", str(tiny_checkpoint), "--method", "ce", "--outliers", "oe"]
    argv += ["--aux", str(tmp_path / "outliers"), "--recipe", "quick", "--epochs", "1"]
    argv += ["--data-dir", str(fmnist_dir), "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main([*argv, "--no-progress"]) == 0
    assert "decoding" not in capsys.readouterr().err
    with decoding_bars(False):
        formats.load_image_folder(tmp_path / "outliers", 16, 1)
    assert "decoding" not in capsys.readouterr().err
    formats.load_image_folder(tmp_path / "outliers", 8, 1)
    assert "decoding" in capsys.readouterr().err


def test_unreadable_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write_pictures(tmp_path / "pics", 2, seed=0)
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        images = formats.load_image_folder(tmp_path / "pics", 32, 3)
    assert len(images) == 2


def test_folder_without_readable_images_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        formats.load_image_folder(tmp_path / "empty", 32, 3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 1 image files"):
        formats.load_image_folder(tmp_path / "bad", 32, 3)


def test_second_load_comes_from_the_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pictures(tmp_path / "pics", 3, seed=0)
    first = formats.load_image_folder(tmp_path / "pics", 32, 3)
    assert list(cache.rglob("*.npy"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(Image, "open", no_decoding)
    torch.testing.assert_close(formats.load_image_folder(tmp_path / "pics", 32, 3), first)


def test_cache_is_rebuilt_when_a_file_is_added(tmp_path: Path) -> None:
    paths = write_pictures(tmp_path / "pics", 3, seed=0)
    assert len(formats.load_image_folder(tmp_path / "pics", 32, 3)) == 3
    Image.open(paths[0]).save(tmp_path / "pics" / "zzz.png")
    assert len(formats.load_image_folder(tmp_path / "pics", 32, 3)) == 4


def test_limit_takes_a_seeded_subset(tmp_path: Path) -> None:
    write_pictures(tmp_path / "pics", 8, seed=0, size=(32, 32))
    full = formats.load_image_folder(tmp_path / "pics", 32, 3)
    a = formats.load_image_folder(tmp_path / "pics", 32, 3, limit=3, seed=1)
    b = formats.load_image_folder(tmp_path / "pics", 32, 3, limit=3, seed=1)
    torch.testing.assert_close(a, b)
    rows = {bytes(x.numpy().tobytes()) for x in full}
    assert len(a) == 3 and all(x.numpy().tobytes() in rows for x in a)


def test_imglist_names_files_relative_to_its_base(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("tin/val/a.JPEG -1\n\ntin/val/b.JPEG -1\n")
    assert formats.read_imglist(tmp_path / "list.txt", tmp_path / "ic") == [
        tmp_path / "ic/tin/val/a.JPEG",
        tmp_path / "ic/tin/val/b.JPEG",
    ]


def test_listed_files_that_are_missing_are_a_user_error(tmp_path: Path) -> None:
    paths = write_pictures(tmp_path, 1, seed=0)
    with pytest.raises(UserError, match="1 of 2 listed image files are missing"):
        formats.load_images([*paths, tmp_path / "gone.png"], 32, 3, "listed")


# --------------------------------------------------------------------------- suites


def test_every_dataset_is_registered_and_located(data_root: Path) -> None:
    expected = {
        "cifar10": "cifar-10-batches-py",
        "cifar100": "cifar-100-python",
        "svhn": "svhn/test_32x32.mat",
        "tin": "tiny-imagenet-200",
        "mnist": "mnist",
        **{k: v.split("/")[0] for k, v in FOLDERS.items() if k != "textures"},
        "textures": "dtd/images",
    }
    for name, where in expected.items():
        assert DATASETS[name].locate([data_root]) == data_root / where, name
    for name in ("lsun_resize", "isun"):
        assert DATASETS[name].locate([data_root]) is None


def test_paper_suite_cifar10(data_root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is present: no warning
        bench = SUITES["cifar10"].load([data_root])
    assert list(bench.ood_test) == [
        "cifar100",
        "inaturalist",
        "sun",
        "places365",
        "textures",
        "lsun",
        "svhn",
    ]
    assert list(bench.ood_val) == ["tin"] and len(bench.ood_val["tin"]) == 6  # TIN test/
    assert bench.ood_groups == {}
    assert bench.num_classes == 10 and bench.mean == (0.4914, 0.4822, 0.4465)
    assert bench.class_names[0] == "airplane"
    assert (len(bench.id_train), len(bench.id_val), len(bench.id_test)) == (180, 20, 50)
    assert len(bench.ood_test["cifar100"]) == 200 and len(bench.ood_test["svhn"]) == 5
    for images in [*bench.ood_test.values(), bench.id_test]:
        assert images.shape == (3, 32, 32)
    assert (bench.ood_test["lsun"].labels == -1).all()


def test_id_split_is_stratified_disjoint_and_deterministic(data_root: Path) -> None:
    first = cifar.load_id(cifar.ID_SPECS["cifar10"], [data_root])
    again = cifar.load_id(cifar.ID_SPECS["cifar10"], [data_root])
    torch.testing.assert_close(first.val.images, again.val.images)
    assert torch.bincount(first.val.labels).tolist() == [2] * 10
    rows = lambda s: {x.numpy().tobytes() for x in s.images}  # noqa: E731
    assert not rows(first.train) & rows(first.val)
    assert rows(first.train) | rows(first.val) == {x.tobytes() for x in CIFAR10_TRAIN[0]}


def test_paper_suite_uses_what_is_there_and_warns(data_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "partial"
    root.mkdir()
    (root / "cifar-100-python").symlink_to(data_root / "cifar-100-python")
    (root / "LSUN").symlink_to(data_root / "LSUN")
    with pytest.warns(UserWarning) as record:
        bench = SUITES["cifar100"].load([root])
    messages = " ".join(str(w.message) for w in record)
    assert "left out: cifar10, inaturalist, sun, places365, textures, svhn" in messages
    assert "no OOD validation set" in messages
    assert list(bench.ood_test) == ["lsun"] and bench.ood_val == {}
    assert bench.num_classes == 100 and bench.class_names[5] == "class5"


def test_missing_data_errors_name_the_paths_tried(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"tried {tmp_path / 'cifar-10-batches-py'}"):
        SUITES["cifar10"].load([tmp_path])
    (tmp_path / "cifar-10-batches-py").symlink_to(data_root / "cifar-10-batches-py")
    with pytest.raises(UserError, match="none of its OOD test sets"):
        SUITES["cifar10"].load([tmp_path])


def test_openood_suite_from_folders(data_root: Path) -> None:
    with pytest.warns(UserWarning, match="lists not found"):
        bench = SUITES["cifar10-openood"].load([data_root])
    assert bench.ood_groups == {
        "near": ("cifar100", "tin"),
        "far": ("mnist", "svhn", "textures", "places365"),
    }
    assert set(bench.ood_test) == {"cifar100", "tin", "mnist", "svhn", "textures", "places365"}
    assert len(bench.ood_test["tin"]) == 4 and len(bench.ood_val["tin"]) == 6  # val/ vs test/
    assert len(bench.ood_test["mnist"]) == 10 and bench.ood_test["mnist"].shape == (3, 32, 32)
    assert bench.name == "cifar10-openood"


def test_openood_suite_with_image_lists(data_root: Path, tmp_path: Path) -> None:
    """OpenOOD's lists pick exactly the listed files out of ``images_classic``."""
    root = tmp_path / "openood"
    root.mkdir()
    lists = root / "benchmark_imglist" / "cifar100"
    lists.mkdir(parents=True)
    sets = ("cifar10", "tin", "mnist", "svhn", "texture", "places365", "val_tin")
    for i, name in enumerate(sets):
        write_pictures(root / "images_classic" / name / "test", 3, seed=30 + i, size=(32, 32))
        list_name = name if name == "val_tin" else f"test_{name}"
        (lists / f"{list_name}.txt").write_text(
            f"{name}/test/img000.png -1\n{name}/test/img002.png -1\n"
        )
    (root / "cifar-100-python").symlink_to(data_root / "cifar-100-python")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench = SUITES["cifar100-openood"].load([root])
    assert bench.ood_groups["near"] == ("cifar10", "tin")
    assert {k: len(v) for k, v in bench.ood_test.items()} == {
        "cifar10": 2,
        "tin": 2,
        "mnist": 2,
        "svhn": 2,
        "textures": 2,
        "places365": 2,
    }
    assert len(bench.ood_val["tin"]) == 2


def test_openood_suite_requires_every_set(data_root: Path, tmp_path: Path) -> None:
    for name in ("cifar-10-batches-py", "cifar-100-python", "tiny-imagenet-200", "mnist"):
        (tmp_path / name).symlink_to(data_root / name)
    with pytest.raises(
        UserError,
        match=r"SVHN.*tried .*svhn/test_32x32\.mat.*also missing: "
        "textures, places365",
    ):
        SUITES["cifar10-openood"].load([tmp_path])


def test_flat_tin_folder_is_split_into_disjoint_halves(tmp_path: Path) -> None:
    write_pictures(tmp_path / "tin", 9, seed=3, size=(64, 64))
    test = cifar.TIN.load([tmp_path])
    val = cifar.TIN_VAL.load([tmp_path])
    assert (len(test), len(val)) == (5, 4)
    rows = lambda s: {x.numpy().tobytes() for x in s.images}  # noqa: E731
    assert not rows(test) & rows(val)
