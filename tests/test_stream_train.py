"""Training on streamed image files: --workers on the training commands, pretrain and every
fine-tune on a JPEG benchmark file (UM, UMAP, OE, WOODS / SCONE), the lazily fetched wild mix,
YAML benchmark files, and broken images as one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import fake_fashion, write_images
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.data import load_benchmark
from unleash_ood.data.base import ImageSet
from unleash_ood.data.concat import ConcatData
from unleash_ood.data.streaming import ImageFiles
from unleash_ood.errors import UserError
from unleash_ood.method.finetune import FinetuneSpec, finetune, finetune_recipe
from unleash_ood.method.outliers import OutlierStream
from unleash_ood.method.wild import build_wild_mix
from unleash_ood.specs import OutlierSpec, Recipe
from unleash_ood.train import pretrain

SPEC = {
    "name": "tiny-jpeg",
    "resolution": 28,
    "channels": 1,
    "classes": [f"c{c}" for c in range(10)],
    "mean": [0.286],
    "std": [0.353],
    "id": {"train": "train", "val": "val", "test": "test"},
    "ood_val": {"dark": "dark"},
    "ood_test": {"noise": "noise", "dark": "dark"},
}
YAML = """\
name: tiny-jpeg
resolution: 28
channels: 1
classes: [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9]
mean: [0.286]
std: [0.353]
id: {train: train, val: val, test: test}
ood_val:
  dark: dark
ood_test:
  noise: noise
  dark: dark
"""


def write_jpeg_layout(root: Path, n_train: int = 200) -> None:
    """The fake Fashion-MNIST as JPEG folders: ImageFolder ID splits and two OOD folders."""
    for split, n, seed in (("train", n_train, 0), ("val", 40, 1), ("test", 40, 2)):
        images, labels = fake_fashion(n, seed)
        write_images(root / split, images, labels, "jpg")
    rng = np.random.default_rng(3)
    write_images(root / "noise", rng.integers(0, 255, (40, 28, 28), dtype=np.uint8), None, "jpg")
    write_images(root / "dark", rng.integers(0, 40, (30, 28, 28), dtype=np.uint8), None, "jpg")


@pytest.fixture(scope="module")
def jpeg_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG benchmark layout described twice: bench.json and bench.yaml."""
    root = tmp_path_factory.mktemp("jpeg")
    write_jpeg_layout(root)
    (root / "bench.json").write_text(json.dumps(SPEC))
    (root / "bench.yaml").write_text(YAML)
    return root / "bench.json"


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


TRAIN_FLAGS = ["--device", "cpu", "--no-progress", "--epochs", "1", "--batch-size", "50"]


# --------------------------------------------------------------------------- --workers


def test_cli_pretrains_on_a_benchmark_file_with_workers(capsys, jpeg_bench, tmp_path) -> None:
    out = tmp_path / "pre"
    argv = ["pretrain", "--benchmark", str(jpeg_bench), "--workers", "1", "--out", str(out)]
    argv += ["--model-arg", "width=4", *TRAIN_FLAGS]
    code, err = run_cli(capsys, argv)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["workers"] == 1 and config["train_size"] == 200
    _, meta = load_checkpoint(out / "checkpoints" / "last")
    assert meta["benchmark"] == "tiny-jpeg" and meta["epoch"] == 1
    argv = ["track", str(out), "--benchmark", str(jpeg_bench), "--workers", "1"]
    code, err = run_cli(capsys, [*argv, "--device", "cpu", "--no-progress"])
    assert code == 0, err
    assert (out / "track.csv").read_text().count("\n") > 1


def test_pretrain_api_gives_the_same_model_with_and_without_workers(jpeg_bench, tmp_path) -> None:
    bench = load_benchmark(str(jpeg_bench))
    recipe = Recipe(model_kwargs={"width": 4}, epochs=1, batch_size=50)
    for workers in (0, 2):
        pretrain(bench, recipe, tmp_path / f"w{workers}", "cpu", progress=False, workers=workers)
    a, _ = load_checkpoint(tmp_path / "w0" / "checkpoints" / "last")
    b, _ = load_checkpoint(tmp_path / "w2" / "checkpoints" / "last")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["workers"] == 2


def test_finetune_api_takes_workers(jpeg_bench, tiny_checkpoint, tmp_path) -> None:
    bench = load_benchmark(str(jpeg_bench))
    recipe = finetune_recipe("ce", epochs=1, batch_size=50)
    spec = FinetuneSpec(
        method="ce", outliers=OutlierSpec(method="oe", aux=str(jpeg_bench.parent / "noise"))
    )
    final, choice = finetune(
        bench, tiny_checkpoint, spec, recipe, tmp_path / "ft", "cpu", progress=False, workers=1
    )
    assert choice.xi is None and final.with_suffix(".safetensors").exists()
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["workers"] == 1


def test_negative_workers_are_refused(capsys, jpeg_bench, tmp_path) -> None:
    out = tmp_path / "bad"
    argv = ["pretrain", "--benchmark", str(jpeg_bench), "--workers", "-1", "--out", str(out)]
    code, err = run_cli(capsys, [*argv, *TRAIN_FLAGS])
    assert code == 2 and "--workers" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(UserError, match="workers must be an integer >= 0"):
        pretrain(load_benchmark(str(jpeg_bench)), Recipe(), tmp_path / "api", "cpu", workers=-2)


# --------------------------------------------------------------------------- fine-tunes


@pytest.mark.parametrize(
    ("bench_name", "extra", "workers"),
    [
        ("bench.json", ["--method", "um", "--n-masks", "2"], "1"),
        ("bench.yaml", ["--method", "umap"], "0"),
        ("bench.json", ["--method", "ce", "--outliers", "oe", "--aux", "{root}/noise"], "0"),
        ("bench.json", ["--method", "um", "--outliers", "woods", "--wild", "{root}/noise"], "1"),
        ("bench.yaml", ["--method", "ce", "--outliers", "scone", "--wild", "{root}/dark"], "0"),
    ],
)
def test_cli_finetunes_on_a_benchmark_file(
    capsys, jpeg_bench, tiny_checkpoint, tmp_path, bench_name, extra, workers
) -> None:
    root = jpeg_bench.parent
    out = tmp_path / "ft"
    argv = ["finetune", "--from", str(tiny_checkpoint), "--benchmark", str(root / bench_name)]
    argv += ["--workers", workers, "--out", str(out), *TRAIN_FLAGS, "--recipe", "quick"]
    argv += [e.format(root=root) for e in extra]
    code, err = run_cli(capsys, argv)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["workers"] == int(workers) and config["train_size"] == 200
    final, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["benchmark"] == "tiny-jpeg"
    start, _ = load_checkpoint(tiny_checkpoint)
    assert not torch.equal(final.head.weight, start.head.weight)
    xi = json.loads((out / "xi.json").read_text())
    assert (xi["source"] == "estimate") == ("um" in extra or "umap" in extra)
    if "--wild" in extra:
        comp = json.loads((out / "wild.json").read_text())
        assert comp["size"] <= 200 and comp["n_outliers"] >= 1
        assert comp["n_id"] + comp["n_shifted"] + comp["n_outliers"] == comp["size"]
        assert max(comp["id_indices"] + comp["shifted_indices"]) < 200
        assert (comp["n_shifted"] > 0) == ("scone" in extra)


# --------------------------------------------------------------------------- the wild mix


def decoded(files: ImageFiles) -> ImageSet:
    x, y = files.__getitems__(range(len(files)))
    return ImageSet(files.name, (x * 255).round().to(torch.uint8), y)


def test_wild_mix_of_files_reads_no_image_and_equals_the_in_memory_mix(
    jpeg_bench, monkeypatch
) -> None:
    bench = load_benchmark(str(jpeg_bench))
    train, outliers = bench.id_train, bench.ood_test["noise"]
    memory = build_wild_mix(decoded(train), decoded(outliers), "noise", 0.2, 0.5, seed=1)

    def no_decoding(self, idx):
        raise AssertionError("an image was read while the wild mix was built")

    with monkeypatch.context() as m:
        m.setattr(ImageFiles, "decode", no_decoding)
        streamed = build_wild_mix(train, outliers, "noise", 0.2, 0.5, seed=1)
    assert streamed.composition() == memory.composition()
    assert isinstance(streamed.images.parts[0], ImageFiles)
    index = torch.randperm(len(memory.images), generator=torch.Generator().manual_seed(0))[:64]
    x_stream, y_stream = streamed.images.__getitems__(index)
    x_memory, y_memory = memory.images.__getitems__(index)
    assert torch.equal(x_stream, x_memory) and (y_stream == -1).all() and (y_memory == -1).all()


def test_outlier_batches_fetched_ahead_are_the_batches_fetched_here(jpeg_bench) -> None:
    """Batches of 4 from 10 images wrap into a new permutation every 2.5 batches; with workers
    the in-permutation ones come from a loader, the wrapping ones from this process."""
    bench = load_benchmark(str(jpeg_bench))
    mix = build_wild_mix(bench.id_train, decoded(bench.ood_test["noise"]), "noise", 0.5, 0.4, 2)
    aux = mix.images.subset(np.arange(0, 80, 8))  # files, noisy files and outliers
    assert {type(p).__name__ for p in aux.parts} >= {"ImageFiles", "ShiftedImages"}
    got = {}
    for workers in (0, 1):
        stream = OutlierStream(aux, 4, "crop+flip", seed=0, workers=workers)
        got[workers] = []
        for epoch in range(2):
            stream.start_epoch(epoch, 0, 1)
            got[workers] += [stream.next(torch.device("cpu")) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[1], strict=True))


def test_wild_finetune_is_the_same_with_workers(capsys, jpeg_bench, tiny_checkpoint, tmp_path):
    finals = []
    for workers in ("0", "2"):
        out = tmp_path / workers
        argv = ["finetune", "--from", str(tiny_checkpoint), "--benchmark", str(jpeg_bench)]
        argv += ["--method", "ce", "--outliers", "scone", "--wild", str(jpeg_bench.parent / "dark")]
        argv += ["--workers", workers, "--out", str(out), *TRAIN_FLAGS, "--epochs", "2"]
        code, err = run_cli(capsys, argv)
        assert code == 0, err
        finals.append(load_checkpoint(out / "checkpoints" / "final")[0].state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_concat_data_fetches_each_part_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    a = ImageSet("a", torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=g))
    b = ImageSet("b", torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8, generator=g))
    b = b.with_labels(torch.tensor([7, 8, 9]), "b")
    both = ConcatData("ab", [a, b])
    whole = torch.cat([a.images, b.images]).float() / 255
    assert len(both) == 8 and both.shape == (1, 4, 4)
    assert both.labels.tolist() == [-1] * 5 + [7, 8, 9]
    x, y = both.__getitems__([6, 0, 7, 4, 5])
    assert torch.equal(x, whole[[6, 0, 7, 4, 5]]) and y.tolist() == [8, -1, 9, -1, 7]
    part = both.subset(np.array([6, 1, 2, 5]))
    assert [len(p) for p in part.parts] == [1, 2, 1]  # runs of one part keep their order
    assert torch.equal(part.__getitems__(range(4))[0], whole[[6, 1, 2, 5]])
    batches = list(both.batches(3, workers=1))
    assert torch.equal(torch.cat([x for x, _ in batches]), whole)
    relabelled = both.with_labels(torch.arange(8), "n")
    assert relabelled.labels.tolist() == list(range(8))
    assert relabelled.fingerprint() != both.fingerprint() == ConcatData("x", [a, b]).fingerprint()
    with pytest.raises(IndexError):
        both.__getitems__([8])
    with pytest.raises(ValueError, match="different image shapes"):
        ConcatData("bad", [a, ImageSet("c", torch.zeros(1, 3, 4, 4, dtype=torch.uint8))])


# --------------------------------------------------------------------------- YAML


def test_yaml_file_describes_the_same_benchmark(jpeg_bench) -> None:
    assert yaml.safe_load(YAML) == SPEC
    from_json = load_benchmark(str(jpeg_bench))
    for suffix in (".yaml", ".yml"):
        path = jpeg_bench.with_name(f"bench{suffix}")
        path.write_text(YAML)
        from_yaml = load_benchmark(str(path))
        assert from_yaml.sizes() == from_json.sizes() and from_yaml.name == "tiny-jpeg"
        assert from_yaml.id_train.fingerprint() == from_json.id_train.fingerprint()
        assert from_yaml.ood_test["noise"].paths == from_json.ood_test["noise"].paths


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (YAML.replace("channels: 1", "channels: 2"), "'channels' must be 1 or 3"),
        (YAML + "colour: red\n", "unknown field 'colour'"),
        ("- just\n- a list\n", "expected an object"),
        ("name: [unclosed\n", "not readable YAML"),
        ("!!python/object/apply:os.system [echo owned]\n", "not readable YAML"),
        (YAML + "ood_val: {1: dark, x: dark}\n", "key 1 is not a string; quote it"),
        (YAML.replace("dark: dark\nood_test", "dark: &a [*a]\nood_test"), "ood_val.dark must"),
    ],
)
def test_bad_yaml_is_one_line(jpeg_bench, text: str, words: str) -> None:
    path = jpeg_bench.with_name("bad.yaml")
    path.write_text(text)
    with pytest.raises(UserError, match=words) as info:
        load_benchmark(str(path))
    assert "\n" not in str(info.value)


def test_yaml_without_pyyaml_says_what_to_install(capsys, jpeg_bench, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes ``import yaml`` fail
    out = tmp_path / "run"
    bench = str(jpeg_bench.with_name("bench.yaml"))
    argv = ["pretrain", "--benchmark", bench, "--out", str(out), *TRAIN_FLAGS]
    code, err = run_cli(capsys, argv)
    assert code == 2 and "pip install pyyaml" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------- broken images


def break_files(folder: Path) -> tuple[Path, Path]:
    """Truncate one JPEG and overwrite another with text; returns both."""
    truncated, text = sorted(folder.rglob("*.jpg"))[3:5]
    truncated.write_bytes(truncated.read_bytes()[:200])
    text.write_bytes(b"this is not an image")
    return truncated, text


def test_broken_files_are_named_in_one_line(tmp_path) -> None:
    write_images(tmp_path, fake_fashion(8, 0)[0], None, "jpg")
    for bad in break_files(tmp_path):
        files = ImageFiles("x", [bad, tmp_path / "0000.jpg"], size=28, channels=1)
        for workers in (0, 1):
            with pytest.raises(UserError, match=rf"{bad.name}: not a readable image") as info:
                list(files.batches(2, workers=workers))
            assert "\n" not in str(info.value) and "replace" in str(info.value)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_training_on_a_broken_image_is_one_line(capsys, tmp_path, workers: str) -> None:
    write_jpeg_layout(tmp_path, n_train=100)
    (tmp_path / "bench.json").write_text(json.dumps(SPEC))
    broken = break_files(tmp_path / "train")
    out = tmp_path / "run"
    argv = ["pretrain", "--benchmark", str(tmp_path / "bench.json"), "--workers", workers]
    argv += ["--out", str(out), "--model-arg", "width=4", *TRAIN_FLAGS]
    code, err = run_cli(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "not a readable image" in lines[0] and any(str(p) in lines[0] for p in broken)
    assert not list(out.glob("checkpoints/*"))
    for path in broken:  # replaced, the same command runs: nothing half-written stands in the way
        Image.fromarray(fake_fashion(1, 9)[0][0]).save(path)
    code, err = run_cli(capsys, argv)
    assert code == 0, err


def test_atypical_ranks_streamed_training_images(capsys, jpeg_bench, tiny_checkpoint, tmp_path):
    """The same ranking whether the main process or a worker decodes the images."""
    ranked = []
    for workers in ("0", "1"):
        out = tmp_path / f"aty{workers}"
        argv = ["atypical", "--from", str(tiny_checkpoint), "--benchmark", str(jpeg_bench)]
        argv += ["--n-masks", "2", "--out", str(out), "--device", "cpu", "--no-progress"]
        code, err = run_cli(capsys, [*argv, "--workers", workers])
        assert code == 0, err
        assert (out / "atypical.png").stat().st_size > 0
        ranked.append((out / "atypical.csv").read_text())
    assert len(ranked[0].splitlines()) == 201
    assert ranked[0] == ranked[1]
