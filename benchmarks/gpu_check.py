"""GPU check: the library's evaluation and training throughput against plain PyTorch loops on
the same GPU, and ``torchrun`` evaluation, measured in one run (under 8 minutes on one GPU).

    python benchmarks/gpu_check.py                       # needs a CUDA device
    python benchmarks/gpu_check.py --device cpu --small  # a quick smoke check of the script

1. Evaluation, images/s of a ResNet-50 (random weights) on 224x224 synthetic images, in fp32
   and under bf16 autocast: :func:`~unleash_ood.outputs.forward_outputs` (what the evaluator
   runs once per dataset; it also copies features and logits back to the host) against a plain
   ``model(x)`` loop over the same uint8 batches, converted, copied channels-last and
   normalised the same way. Ratio ours / plain.
2. Training, images/s of a DenseNet-BC-100 at CIFAR size (32x32, batch 128):
   ``Trainer.train_epoch`` with the cross-entropy and the Unleashing Mask objectives against a
   plain SGD cross-entropy loop. Ratios ours / plain.
3. ``torchrun --nproc_per_node=1 -m unleash_ood evaluate`` on small generated Fashion-MNIST
   files with ``--model torchvision:resnet18 --weights none``: it must finish and write metrics.

Throughputs are the best of ``--repeats`` interleaved rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import best_of

from unleash_ood.data.base import ImageSet
from unleash_ood.device import autocast_dtype, prepare_model, to_device
from unleash_ood.method.constraint import UMObjective
from unleash_ood.models import create_model, load_model
from unleash_ood.outputs import forward_outputs
from unleash_ood.train import Recipe, Trainer, cross_entropy


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` then a device synchronisation, so the clock sees the finished work."""

    def run() -> None:
        fn()
        synchronize(device)

    return run


def synthetic_images(n: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageSet("synthetic", images, torch.randint(0, 10, (n,), generator=g))


def evaluation(args: argparse.Namespace, device: torch.device) -> list[str]:
    data = synthetic_images(args.eval_images, args.eval_size)
    model = prepare_model(load_model("torchvision:resnet50", "none"), device).eval()
    lines = []
    for name in ("none", "bf16"):
        dtype = autocast_dtype(name, device)

        @torch.inference_mode()
        def plain(dtype: torch.dtype | None = dtype) -> None:
            for x, _ in data.batches(args.eval_batch):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(to_device(x, device))

        def ours(dtype: torch.dtype | None = dtype) -> None:
            forward_outputs(model, data, device, args.eval_batch, autocast=dtype)

        fns = {"plain": timed(plain, device), "ours": timed(ours, device)}
        for fn in fns.values():  # warm-up: cuDNN's algorithm search, allocator growth
            fn()
        t = best_of(fns, args.repeats)
        rate = {k: len(data) / v for k, v in t.items()}
        label = "fp32" if dtype is None else name
        lines.append(
            f"eval ResNet-50 {args.eval_size}px {label}: plain {rate['plain']:,.0f} img/s, "
            f"forward_outputs {rate['ours']:,.0f} img/s, ratio {rate['ours'] / rate['plain']:.3f}"
        )
    return lines


def training(args: argparse.Namespace, device: torch.device) -> list[str]:
    batch = args.train_batch
    data = synthetic_images(batch * args.train_steps, 32, seed=1)
    recipe = Recipe(epochs=10**6, batch_size=batch, augment="none")
    out = Path(tempfile.mkdtemp())

    def densenet() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model("densenet100", 10, 3)

    def trainer(objective) -> Callable[[], None]:
        t = Trainer(densenet(), recipe, data, data, out, device, {}, objective, progress=False)
        epochs = iter(range(10**6))
        return lambda: t.train_epoch(next(epochs))

    model = prepare_model(densenet(), device)
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )

    def plain() -> None:
        model.train()
        perm = torch.randperm(len(data))
        for s in range(0, len(data) - batch + 1, batch):
            x, y = data.__getitems__(perm[s : s + batch])
            loss = F.cross_entropy(model(to_device(x, device)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    fns = {
        "plain": timed(plain, device),
        "ce": timed(trainer(cross_entropy), device),
        "um": timed(trainer(UMObjective(xi=1.0)), device),
    }
    for fn in fns.values():
        fn()
    t = best_of(fns, args.repeats)
    rate = {k: len(data) / v for k, v in t.items()}
    return [
        f"train DenseNet-BC-100 32px batch {batch}: plain CE {rate['plain']:,.0f} img/s, "
        f"Trainer CE {rate['ce']:,.0f} img/s (ratio {rate['ce'] / rate['plain']:.3f}), "
        f"Trainer UM {rate['um']:,.0f} img/s (ratio {rate['um'] / rate['plain']:.3f})"
    ]


def write_idx(path: Path, array: np.ndarray) -> None:
    """uint8 ``array`` in the IDX format of the MNIST family, gzipped."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def generated_fashion(root: Path, n_train: int, n_test: int) -> None:
    """Fashion-MNIST-format files of random 28x28 images, ten classes in turn."""
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def torchrun_evaluate(device: torch.device) -> list[str]:
    root = Path(tempfile.mkdtemp())
    generated_fashion(root / "data", 1200, 300)
    out = root / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "unleash_ood",
        "evaluate",
        "--model",
        "torchvision:resnet18",
        "--weights",
        "none",
        "--gray-to-rgb",
        "--data-dir",
        str(root / "data"),
        "--scores",
        "msp,energy",
        "--out",
        str(out),
        "--device",
        device.type,
        "--no-progress",
    ]
    env = {**os.environ, "UNLEASH_CACHE": str(root / "cache")}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"gpu_check: torchrun evaluate failed ({run.returncode}):\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    processes = json.loads((out / "config.json").read_text())["processes"]
    return [
        f"torchrun --nproc_per_node=1 evaluate: {seconds:.1f} s, {processes} process, "
        f"{len(metrics['rows'])} metric rows written"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke check, not figures")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device here; run it on a machine with a GPU "
            "(or --device cpu --small for a smoke check of the script)"
        )
    sizes = (
        {"eval_images": 32, "eval_size": 64, "eval_batch": 16, "train_batch": 16, "train_steps": 2}
        if args.small
        else {
            "eval_images": 4096,
            "eval_size": 224,
            "eval_batch": 256,
            "train_batch": 128,
            "train_steps": 40,
        }
    )
    vars(args).update(sizes)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}{' (small)' if args.small else ''}")
    t0 = time.perf_counter()
    for section in (evaluation, training):
        for line in section(args, device):
            print(line, flush=True)
    for line in torchrun_evaluate(device):
        print(line, flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
