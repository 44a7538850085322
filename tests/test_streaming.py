"""Streamed image data: folders, image lists, benchmark files, OpenOOD's ImageNet layout,
--fit-samples, the memory-mapped output cache, and the same metrics as in-memory data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_fashion, write_images
from unleash_ood.checkpoint import load_checkpoint, model_spec
from unleash_ood.cli import main
from unleash_ood.data import load_benchmark
from unleash_ood.data.base import Benchmark, ImageSet
from unleash_ood.data.benchmark_file import benchmark_from_spec
from unleash_ood.data.formats import load_images
from unleash_ood.data.noise import TrainingData, stratified_subset
from unleash_ood.data.streaming import (
    ImageFiles,
    class_folder_files,
    decode_file,
    folder_files,
    imglist_files,
)
from unleash_ood.errors import UserError
from unleash_ood.evaluate import Evaluator, OutputCache, evaluate, forward_outputs
from unleash_ood.models import create_model
from unleash_ood.scores import make_scorer
from unleash_ood.train import Recipe, Trainer

SCORERS = "msp,energy,knn,mahalanobis,react,vim"


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A benchmark file over PNG folders of the fake Fashion-MNIST (28x28 grey, 10 classes)."""
    root = tmp_path_factory.mktemp("bench")
    for split, n, seed in (("train", 200, 0), ("val", 40, 1), ("test", 60, 2)):
        images, labels = fake_fashion(n, seed)
        write_images(root / split, images, labels)
    rng = np.random.default_rng(3)
    write_images(root / "noise", rng.integers(0, 255, (30, 28, 28), dtype=np.uint8))
    write_images(root / "dark", rng.integers(0, 40, (20, 28, 28), dtype=np.uint8))
    spec = {
        "name": "tiny-png",
        "resolution": 28,
        "channels": 1,
        "classes": [f"c{c}" for c in range(10)],
        "mean": [0.286],
        "std": [0.353],
        "id": {"train": "train", "val": {"folder": "val"}, "test": "test"},
        "ood_val": {"dark": "dark"},
        "ood_test": {"noise": "noise", "dark": "dark"},
        "groups": {"far": ["noise"]},
    }
    (root / "bench.json").write_text(json.dumps(spec))
    return root / "bench.json"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]


def in_memory(bench: Benchmark) -> Benchmark:
    """The same benchmark with every set decoded into an :class:`ImageSet` by the eager reader."""

    def decoded(files: ImageFiles) -> ImageSet:
        images = load_images([Path(p) for p in files.paths], 28, 1, files.name)
        return ImageSet(files.name, images, files.labels)

    return Benchmark(
        bench.name,
        bench.num_classes,
        bench.mean,
        bench.std,
        decoded(bench.id_train),
        decoded(bench.id_val),
        decoded(bench.id_test),
        {k: decoded(v) for k, v in bench.ood_test.items()},
        {k: decoded(v) for k, v in bench.ood_val.items()},
        ood_groups=bench.ood_groups,
    )


# --------------------------------------------------------------------------- the file readers


def test_class_folders_give_labels_in_class_order(bench_file: Path) -> None:
    bench = load_benchmark(str(bench_file))
    train = bench.id_train
    assert isinstance(train, ImageFiles) and len(train) == 200
    assert bench.num_classes == 10 and bench.class_names[3] == "c3"
    for path, label in zip(train.paths, train.labels.tolist(), strict=True):
        assert Path(path).parent.name == f"c{label}"
    assert set(bench.ood_test) == {"noise", "dark"} and bench.ood_groups == {"far": ("noise",)}
    assert (bench.ood_test["noise"].labels == -1).all()


def test_decoding_matches_the_image_on_disk(bench_file: Path) -> None:
    files = load_benchmark(str(bench_file)).id_test
    x, y = files.__getitems__([5, 0])
    first = np.asarray(Image.open(files.paths[5]))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.from_numpy(first.copy()).float() / 255)
    assert y.tolist() == files.labels[[5, 0]].tolist()


def test_resize_and_crop_to_the_benchmark_resolution(tmp_path: Path) -> None:
    # a 40x20 RGB image: short side 20 -> 10, long side 40 -> 20, centre 10 columns kept
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, 15:25] = (200, 100, 50)  # the centre quarter, what the crop keeps
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    out = decode_file(str(tmp_path / "wide.png"), 10, 3)
    assert out.shape == (3, 10, 10)
    assert (out[:, :, 3:7] == np.array([200, 100, 50])[:, None, None]).all()
    grey = decode_file(str(tmp_path / "wide.png"), 10, 1, pre_size=12)
    assert grey.shape == (1, 10, 10)


def test_workers_give_the_same_batches(bench_file: Path) -> None:
    files = load_benchmark(str(bench_file)).id_train
    here = list(files.batches(64))
    forked = list(files.batches(64, workers=2))
    assert [len(x) for x, _ in here] == [64, 64, 64, 8]
    for (a, ya), (b, yb) in zip(here, forked, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_imglist_reads_openood_lines(tmp_path: Path) -> None:
    images, _ = fake_fashion(4, 0)
    write_images(tmp_path / "img" / "sub", images)
    lines = [f"sub/{i:04d}.png {label}" for i, label in enumerate((3, 1, 0, 2))]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n\n")
    files = imglist_files(tmp_path / "list.txt", tmp_path / "img", "id", 28, 1, num_classes=4)
    assert files.labels.tolist() == [3, 1, 0, 2]
    assert files.paths[1] == str(tmp_path / "img" / "sub" / "0001.png")
    ood = imglist_files(tmp_path / "list.txt", tmp_path / "img", "ood", 28, 1, labelled=False)
    assert (ood.labels == -1).all()


def test_subset_and_fingerprint_cover_the_file_list(bench_file: Path) -> None:
    files = load_benchmark(str(bench_file)).id_train
    part = files.subset(torch.tensor([4, 2]))
    assert part.paths == [files.paths[4], files.paths[2]]
    assert part.labels.tolist() == files.labels[[4, 2]].tolist()
    assert files.fingerprint() == load_benchmark(str(bench_file)).id_train.fingerprint()
    assert part.fingerprint() != files.subset(torch.tensor([2, 4])).fingerprint()
    relabelled = ImageFiles("x", files.paths, torch.zeros(len(files)), 28, 1)
    assert relabelled.fingerprint() != files.fingerprint()


# --------------------------------------------------------------------------- OpenOOD's layout


def openood_tree(root: Path) -> None:
    """OpenOOD v1.5's ImageNet layout, three classes, a few 40x30 JPEGs per list."""
    rng = np.random.default_rng(0)
    lists = root / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    sets = {
        "train_imagenet": "imagenet_1k/train",
        "val_imagenet": "imagenet_1k/val",
        "test_imagenet": "imagenet_1k/test",
        "val_openimage_o": "openimage_o/val",
        **{f"test_{n}": n for n in ("ssb_hard", "ninco", "inaturalist", "textures")},
        "test_openimage_o": "openimage_o/test",
    }
    for list_name, folder in sets.items():
        lines = []
        for i in range(6):
            rel = f"{folder}/{i}.JPEG"
            (root / "images_largescale" / folder).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images_largescale" / rel, "JPEG")
            lines.append(f"{rel} {i % 3}")
        (lists / f"{list_name}.txt").write_text("\n".join(lines) + "\n")


def test_imagenet_openood_suite_reads_the_layout(tmp_path: Path) -> None:
    openood_tree(tmp_path)
    for name in ("imagenet-openood", "imagenet"):
        bench = load_benchmark(name, tmp_path)
        assert bench.name == name and bench.num_classes == 1000
        assert bench.image_shape == (3, 224, 224)
        assert bench.id_train.labels.tolist() == [0, 1, 2, 0, 1, 2]
        assert set(bench.ood_test) == {*bench.ood_groups["near"], *bench.ood_groups["far"]}
        assert bench.ood_groups["far"] == ("inaturalist", "textures", "openimage_o")
        assert bench.ood_groups["near"] == ("ssb_hard", "ninco")
        assert list(bench.ood_val) == ["openimage_o"]
    x, _ = bench.ood_test["ninco"].__getitems__([0])
    assert x.shape == (1, 3, 224, 224)


def test_imagenet_openood_missing_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"OpenOOD v1\.5 ImageNet-1K not found"):
        load_benchmark("imagenet-openood", tmp_path)
    openood_tree(tmp_path)
    (tmp_path / "images_largescale" / "ninco" / "3.JPEG").unlink()
    with pytest.raises(UserError, match=r"1 of 6 listed files are missing.*ninco/3\.JPEG"):
        load_benchmark("imagenet-openood", tmp_path)


# --------------------------------------------------------------------------- fit samples


def test_fit_sample_keeps_class_shares_and_is_seeded() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)

    def draw(n: int, seed: int, stream: str = "fit-samples") -> np.ndarray:
        return stratified_subset(labels, n, seed, stream)

    index = draw(20, 1)
    assert len(set(index.tolist())) == 20 and (np.diff(index) > 0).all()
    assert np.bincount(labels[index]).tolist() == [12, 6, 2]
    assert np.array_equal(index, draw(20, 1))
    assert not np.array_equal(index, draw(20, 2))
    assert not np.array_equal(index, draw(20, 1, "subset"))  # its own random stream
    # largest remainders: 6.6 / 3.3 / 1.1 -> 7 / 3 / 1
    assert np.bincount(labels[draw(11, 0)]).tolist() == [7, 3, 1]


def test_fit_samples_bounds_the_fit_set(model, bench_file: Path) -> None:
    bench = load_benchmark(str(bench_file))
    knn = make_scorer("knn", k=5)
    ev = Evaluator(model, bench, [knn], device="cpu", progress=False, fit_samples=50, seed=3)
    ev.run()
    assert knn.bank_.shape[0] == 50
    fitted = ev.fit_set()
    assert torch.bincount(fitted.labels).tolist() == [5] * 10
    again = Evaluator(model, bench, [], device="cpu", progress=False, fit_samples=50, seed=3)
    assert again.fit_set().paths == fitted.paths


def test_training_subset_and_label_noise_work_on_files(bench_file: Path) -> None:
    train = load_benchmark(str(bench_file)).id_train
    noisy, flipped = TrainingData(size=100, label_noise=0.2, seed=0).apply(train)
    assert isinstance(noisy, ImageFiles) and len(noisy) == 100 and len(flipped) == 20
    kept = [train.paths.index(p) for p in noisy.paths]
    changed = np.flatnonzero(noisy.labels.numpy() != train.labels.numpy()[kept])
    assert np.array_equal(changed, flipped)


# --------------------------------------------------------------------------- same results


def test_streaming_and_in_memory_give_identical_results(model, bench_file: Path) -> None:
    streamed = load_benchmark(str(bench_file))
    memory = in_memory(streamed)
    a = forward_outputs(model, streamed.id_test, batch_size=16, workers=1)
    b = forward_outputs(model, memory.id_test, batch_size=16)
    assert torch.equal(a.features, b.features) and torch.equal(a.logits, b.logits)
    kw = {"device": "cpu", "progress": False, "splits": ("val", "test"), "fit_samples": 80}
    ev_stream = evaluate(model, streamed, SCORERS, workers=2, **kw)
    ev_memory = evaluate(model, memory, SCORERS, **kw)
    assert ev_stream.rows == ev_memory.rows and ev_stream.accuracy == ev_memory.accuracy


def test_training_on_files_matches_training_in_memory(bench_file: Path, tmp_path: Path) -> None:
    streamed = load_benchmark(str(bench_file))
    memory = in_memory(streamed)
    recipe = Recipe(model_kwargs={"width": 4}, epochs=2, batch_size=50, lr=0.05)

    def train(bench: Benchmark, workers: int, out: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_model("cnn", num_classes=10, in_channels=1, width=4)
        spec = model_spec(model, "cnn", 28, {"width": 4})
        trainer = Trainer(
            model, recipe, bench.id_train, bench.id_val, out, torch.device("cpu"), spec,
            progress=False, workers=workers,
        )  # fmt: skip
        trainer.fit()
        return model.state_dict()

    want = train(memory, 0, tmp_path / "memory")
    got = train(streamed, 2, tmp_path / "streamed")
    assert all(torch.equal(want[k], got[k]) for k in want)


# --------------------------------------------------------------------------- the output cache


def test_cache_is_memory_mapped_and_reused(model, bench_file: Path, tmp_path: Path) -> None:
    bench = load_benchmark(str(bench_file))
    first = evaluate(model, bench, SCORERS, device="cpu", progress=False, cache_dir=tmp_path)
    folders = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert any(f.startswith("test-noise-") for f in folders) and len(folders) == 4
    cache = OutputCache(tmp_path, model)
    key = f"id_test-{bench.id_test.fingerprint()}"
    out = cache.get(key)
    features = np.load(cache.dir / key / "features.npy", mmap_mode="r", allow_pickle=False)
    assert isinstance(features, np.memmap) and out.features.dtype == torch.float32
    assert torch.equal(out.features, forward_outputs(model, bench.id_test).features)

    class Refusing(torch.nn.Module):
        """The same weights, but any forward pass fails: everything must come from the cache."""

        def __init__(self):
            super().__init__()
            self.inner = model
            self.head = model.head

        def features(self, x):
            raise AssertionError("forward pass despite the cache")

    again = Evaluator(Refusing(), bench, SCORERS, device="cpu", progress=False, cache_dir=tmp_path)
    again.cache.dir = cache.dir  # the wrapper's fingerprint differs from the model's
    assert again.run().rows == first.rows


def test_cache_fp16_halves_the_features(model, bench_file: Path, tmp_path: Path) -> None:
    bench = load_benchmark(str(bench_file))
    out = forward_outputs(model, bench.id_test)
    cache = OutputCache(tmp_path, model, fp16=True)
    cache.put("k", out)
    stored = np.load(cache.dir / "k-fp16" / "features.npy", allow_pickle=False)
    assert stored.dtype == np.float16
    back = cache.get("k")
    assert back.features.dtype == torch.float32
    assert torch.equal(back.features, out.features.half().float())
    assert torch.equal(back.logits, out.logits)
    assert OutputCache(tmp_path, model).get("k") is None  # float32 entries are kept apart


def test_damaged_cache_is_computed_again(model, bench_file: Path, tmp_path: Path) -> None:
    out = forward_outputs(model, load_benchmark(str(bench_file)).id_val)
    cache = OutputCache(tmp_path, model)
    cache.put("k", out)
    np.save(cache.dir / "k" / "labels.npy", np.zeros(3, dtype=np.int64))  # wrong length
    assert cache.get("k") is None
    (cache.dir / "k" / "logits.npy").write_bytes(b"not an array")
    assert cache.get("k") is None


# --------------------------------------------------------------------------- bad input


def test_broken_image_names_the_file(tmp_path: Path) -> None:
    write_images(tmp_path, fake_fashion(3, 0)[0])
    (tmp_path / "0001.png").write_bytes(b"\x89PNG broken")
    files = folder_files(tmp_path, "broken", 28, 1)
    for workers in (0, 1):
        with pytest.raises(UserError, match=r"0001\.png: not a readable image") as info:
            list(files.batches(2, workers=workers))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"channels": 2}, "'channels' must be 1 or 3"),
        ({"resolution": 0}, "'resolution' must be a positive integer"),
        ({"resolution": True}, "'resolution' must be a positive integer"),
        ({"pre_size": 10}, "'pre_size' must be at least"),
        ({"colour": 1}, "unknown field 'colour'"),
        ({"classes": ["a", "a"]}, "names a class twice"),
        ({"classes": "ten"}, "'classes' must be"),
        ({"mean": [0.5, 0.5]}, "'mean' must be a list of 1"),
        ({"std": [0.0]}, "'std' must be"),
        ({"id": {"train": "train", "test": "test"}}, "exactly the sources"),
        ({"ood_test": {}}, "'ood_test' must map"),
        ({"ood_test": {"noise": 3}}, "ood_test.noise must be a folder"),
        ({"ood_test": {"n": {"imglist": "x", "bad": 1}}}, "ood_test.n must be"),
        ({"groups": {"near": ["nope"]}}, "group 'near' names 'nope'"),
        ({"ood_test": {"noise": "noise", "gone": "nowhere"}}, "folder .*nowhere of ood_test/gone"),
        ({"classes": 5}, "labels up to 9 but the benchmark has 5 classes"),
        ({"classes": ["c0", "c1"]}, "sub-folder 'c2' is not one of the benchmark's classes"),
    ],
)
def test_bad_benchmark_file_is_one_line(bench_file: Path, change: dict, words: str) -> None:
    spec = {**json.loads(bench_file.read_text()), **change}
    with pytest.raises(UserError, match=words) as info:
        benchmark_from_spec(spec, bench_file.parent, "bench.json")
    assert "\n" not in str(info.value)


def test_bad_lists_and_folders(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a.png 0\nb.png seven\n")
    with pytest.raises(UserError, match=r"list\.txt:2: expected 'path label'"):
        imglist_files(tmp_path / "list.txt", tmp_path, "x", 28, 1)
    (tmp_path / "list.txt").write_text("a.png 12\n")
    with pytest.raises(UserError, match=r"label in 0\.\.9"):
        imglist_files(tmp_path / "list.txt", tmp_path, "x", 28, 1, num_classes=10)
    with pytest.raises(UserError, match="not found"):
        imglist_files(tmp_path / "none.txt", tmp_path, "x", 28, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        folder_files(tmp_path / "empty", "x", 28, 1)
    with pytest.raises(UserError, match="no class sub-folders"):
        class_folder_files(tmp_path / "empty", "x", 28, 1)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("workers", ["0", "1"])
def test_cli_evaluates_a_benchmark_file(
    capsys, bench_file: Path, tiny_checkpoint: Path, tmp_path: Path, workers: str
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--benchmark",
            str(bench_file),
            "--workers",
            workers,
            "--fit-samples",
            "30",
            "--scores",
            "knn:k=5,mahalanobis",
            "--cache",
            str(tmp_path / "cache"),
            "--cache-fp16",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == "tiny-png"
    datasets = {r["dataset"] for r in metrics["rows"]}
    assert {"noise", "dark", "mean", "far"} <= datasets
    config = json.loads((out / "config.json").read_text())
    assert config["sizes"]["id_train"] == 200 and config["fit_samples"] == 30
    assert any(p.name.endswith("-fp16") for p in (tmp_path / "cache").rglob("*"))
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--workers", "-1"], "--workers"),
        (["--fit-samples", "0"], "--fit-samples"),
        (["--cache-fp16"], "add --cache"),
        (["--benchmark", "missing.json"], "benchmark file missing.json not found"),
    ],
)
def test_cli_bad_flags_are_one_line(
    capsys, tiny_checkpoint: Path, tmp_path: Path, argv: list[str], words: str
) -> None:
    out = tmp_path / "run"
    try:
        flags = ["--out", str(out), "--device", "cpu", "--no-progress", *argv]
        code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), *flags])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_scores_all_warns_in_one_line_of_what_it_leaves_out(
    capsys, tmp_path: Path, bench_file: Path
) -> None:
    """--scores all on a model without a feature map: every other scorer, one warning line."""
    argv = ["evaluate", "--model", "torchvision:shufflenet_v2_x0_5", "--weights", "none"]
    argv += ["--gray-to-rgb", "--benchmark", str(bench_file), "--scores", "all"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err
    assert err == (
        "unleash evaluate: warning: scores 'all' leaves out mode, rankfeat, mahalanobis_layers, "
        "gram: they read the last feature map before pooling, which ExternalModel does not "
        "expose\n"
    )
    rows = json.loads((tmp_path / "all" / "metrics.json").read_text())["rows"]
    assert len({r["scorer"] for r in rows}) == 29
