"""Shared fixtures: an isolated cache, small Fashion-MNIST-format files, a tiny checkpoint,
and that small Fashion-MNIST cut further for the generative detectors' commands."""

from __future__ import annotations

import dataclasses
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unleash_ood.checkpoint import load_checkpoint, model_spec, save_checkpoint
from unleash_ood.generative.trainer import DetectorTrainer
from unleash_ood.method.finetune import finetune
from unleash_ood.models import create_model


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Derived data goes to a per-session folder; nothing is downloaded."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNLEASH_CACHE", str(root))
    mp.setenv("UNLEASH_OFFLINE", "1")
    mp.delenv("UNLEASH_DATA", raising=False)
    yield root
    mp.undo()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format of the MNIST family, gzipped."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images: class c is a bright bar at row 2c plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 220
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_images(
    folder: Path, images: np.ndarray, labels: np.ndarray | None = None, suffix: str = "png"
) -> None:
    """Grey images as files (lossless PNG, or any Pillow format by ``suffix``), in ImageFolder
    layout (``c<label>/``) when labelled."""
    for i, image in enumerate(images):
        sub = folder / f"c{labels[i]}" if labels is not None else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:04d}.{suffix}")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --data-dir holding a small Fashion-MNIST in its original file layout."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "fashion-mnist"
    folder.mkdir()
    for split, n, seed in (("train", 1200, 0), ("t10k", 300, 1)):
        images, labels = fake_fashion(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def tiny_benchmark(fmnist_dir: Path):
    from unleash_ood.data import load_benchmark

    return load_benchmark("fmnist", fmnist_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_benchmark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 CNN fitted for a few steps on the small Fashion-MNIST, saved as a checkpoint."""
    torch.manual_seed(0)
    b = tiny_benchmark
    model = create_model("cnn", num_classes=10, in_channels=1, mean=b.mean, std=b.std, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = b.id_train.__getitems__(range(len(b.id_train)))
    model.train()
    for _ in range(30):
        idx = torch.randint(0, len(y), (128,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model.eval(), model_spec(model, "cnn", 28, {"width": 4}))
    return path


# torchrun as a module of this interpreter: a ``torchrun`` script on PATH may be missing (or
# belong to another Python) when the tests run from a virtual environment's python.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def detector_argv(kind: str, run: Path, model_args, epochs: int, *extra: str) -> list[str]:
    """``unleash detector train --kind KIND`` with ``--model-arg`` for each of ``model_args``:
    ``epochs`` epochs of batch 32 on the CPU into ``run``."""
    options = [a for kv in model_args for a in ("--model-arg", kv)]
    return [
        *("detector", "train", "--kind", kind, *options, "--epochs", str(epochs)),
        *("--batch-size", "32", "--out", str(run), "--device", "cpu", "--no-progress", *extra),
    ]


def watermark_argv(fmnist_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    """``unleash watermark`` of ``ckpt`` on the small Fashion-MNIST, on the CPU."""
    return [
        *("watermark", "--from", str(ckpt), "--data-dir", str(fmnist_dir), "--out", str(out)),
        *("--device", "cpu", "--no-progress", *extra),
    ]


def finetune_argv(fmnist_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    """``unleash finetune`` on the small Fashion-MNIST: one epoch of batch 128 on the CPU."""
    return [
        "finetune",
        "--from",
        str(ckpt),
        "--data-dir",
        str(fmnist_dir),
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


class Interrupt(Exception):
    """Stands for a run stopped after its first saved epoch."""


def _stop_after_first_epoch(epoch, model, stats) -> None:
    if epoch == 1:
        raise Interrupt


def interrupted_and_resumed(benchmark, checkpoint, spec, recipe, tmp_path: Path):
    """Fine-tune ``spec`` straight through into ``tmp_path/a``, and stopped after the first
    epoch then resumed into ``tmp_path/b``; returns both final models' state dicts."""

    def run(out: Path, **kwargs):
        return finetune(benchmark, checkpoint, spec, recipe, out, "cpu", progress=False, **kwargs)

    whole, _ = run(tmp_path / "a")
    with pytest.raises(Interrupt):
        run(tmp_path / "b", on_save=_stop_after_first_epoch)
    resumed, _ = run(tmp_path / "b", resume=True)
    return load_checkpoint(whole)[0].state_dict(), load_checkpoint(resumed)[0].state_dict()


@pytest.fixture
def small_fmnist(monkeypatch, tiny_benchmark):
    """The small Fashion-MNIST cut to 64 training and 32 images per other set, served to the
    commands in place of ``load_benchmark``: a generative detector's step is costly."""
    b = tiny_benchmark

    def cut(data, n: int = 32):
        return data.subset(torch.arange(min(n, len(data))))

    small = dataclasses.replace(
        b,
        id_train=cut(b.id_train, 64),
        id_val=cut(b.id_val),
        id_test=cut(b.id_test),
        ood_test={k: cut(v) for k, v in b.ood_test.items()},
        ood_val={k: cut(v) for k, v in b.ood_val.items()},
    )
    monkeypatch.setattr("unleash_ood.data.load_benchmark", lambda name, data_dir=None: small)
    return small


def interrupt_detector_at_second_epoch(monkeypatch):
    """Make detector training raise KeyboardInterrupt (Ctrl-C) as its second epoch starts;
    returns the function that lets training run on again."""
    train_epoch = DetectorTrainer.train_epoch

    def interrupted(self, epoch: int):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(DetectorTrainer, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(DetectorTrainer, "train_epoch", train_epoch)
