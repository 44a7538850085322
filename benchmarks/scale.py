"""Streamed evaluation at growing data sizes: peak memory and throughput.

    python benchmarks/scale.py [--sizes 5000 20000 80000] [--fit-samples 1000] [--workers 1]

Generates, once, JPEG folders of N images (28x28 grey, the fake Fashion-MNIST pattern: class c
is a bright bar at row 2c) in a benchmark file's layout: ID train N/2 images in ten class
folders, ID test N/4, one OOD set of N/4 noise images, ID validation 200. Then:

- Peak RSS of ``unleash evaluate --benchmark FILE --fit-samples K --workers W`` on the shipped
  ``fmnist_cnn`` with knn, mahalanobis, vim, react, msp and energy, per N: measured as
  ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a fresh wrapper process that runs only
  that command (the largest resident set of the command and its DataLoader workers). Flat
  means the largest is at most 1.2x the smallest. Measured twice: as shipped (the command
  sets glibc's mmap and trim thresholds to 256 MiB, ``unleash_ood.heap.reuse_batch_buffers``,
  so freed batch buffers are reused), and with ``MALLOC_MMAP_THRESHOLD_=131072`` in the
  environment, which the command then leaves alone: every block above 128 KiB is a fresh
  mapping, returned when freed.
- Throughput of the streamed forward pass (``forward_outputs`` over ``ImageFiles``) against a
  plain loop over a ``torch.utils.data.DataLoader`` of the same files, decoded the same way,
  with the same workers, batch size and model; best of ``--repeats`` interleaved rounds on the
  smallest N's ID test set.

For the scorers' own growth with the training rows (fit + score time and peak memory of knn,
mahalanobis, vim and react on 512-dim features), see ``benchmarks/scorer_growth.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import best_of
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.data import load_benchmark
from unleash_ood.data.streaming import decode_file
from unleash_ood.outputs import forward_outputs

SIDE, CLASSES, VAL = 28, 10, 200
SCORERS = "msp,energy,knn,mahalanobis,vim,react"
MIB = 2**20


def write_jpegs(folder: Path, n: int, seed: int, labelled: bool) -> None:
    """``n`` 28x28 grey JPEGs: the class bar pattern in ``c<k>/`` folders, or plain noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 60, (SIDE, SIDE), dtype=np.uint8)
        sub = folder
        if labelled:
            c = i % CLASSES
            pixels[2 + 2 * c : 5 + 2 * c, 4:24] = 220
            sub = folder / f"c{c}"
        else:
            pixels = rng.integers(0, 255, (SIDE, SIDE), dtype=np.uint8)
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(sub / f"{i:06d}.jpg", quality=90)


def make_benchmark(root: Path, n: int) -> Path:
    """The benchmark file of size ``n`` under ``root`` (made once; reused when present)."""
    spec_path = root / f"n{n}" / "bench.json"
    if spec_path.is_file():
        return spec_path
    base = spec_path.parent
    write_jpegs(base / "train", n // 2, 0, True)
    write_jpegs(base / "val", VAL, 1, True)
    write_jpegs(base / "test", n // 4, 2, True)
    write_jpegs(base / "noise", n // 4, 3, False)
    spec = {
        "name": f"scale-{n}",
        "resolution": SIDE,
        "channels": 1,
        "classes": [f"c{c}" for c in range(CLASSES)],
        "mean": [0.286],
        "std": [0.353],
        "id": {"train": "train", "val": "val", "test": "test"},
        "ood_test": {"noise": "noise"},
    }
    spec_path.write_text(json.dumps(spec))
    return spec_path


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_rss(bench: Path, out: Path, fit_samples: int, workers: int, env: dict) -> int:
    """Peak resident bytes of one ``unleash evaluate`` run (with ``env`` added to the
    environment), in a fresh wrapper process."""
    command = [
        *(sys.executable, "-m", "unleash_ood", "evaluate", "--checkpoint", "fmnist_cnn"),
        *("--benchmark", str(bench), "--scores", SCORERS, "--out", str(out)),
        *("--fit-samples", str(fit_samples), "--workers", str(workers)),
        *("--device", "cpu", "--no-progress"),
    ]
    wrapper = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *command],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    return int(result.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


class PlainFiles(Dataset):
    """The baseline: one decoded file per item, batched by the DataLoader's default collate."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_file(self.paths[i], SIDE, 1)).float().div_(255)


@torch.inference_mode()
def plain_loop(model, paths: list[str], batch_size: int, workers: int) -> None:
    loader = DataLoader(PlainFiles(paths), batch_size=batch_size, num_workers=workers)
    for x in loader:
        model.head(model.features(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    p.add_argument("--fit-samples", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--runs", type=int, default=3, help="peak-RSS runs per size (it varies run to run)"
    )
    p.add_argument("--root", default=None, help="folder for the generated images (default: tmp)")
    args = p.parse_args()
    root = Path(args.root or Path(tempfile.gettempdir()) / "unleash-scale")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {Path(__file__).name}")

    benches = {n: make_benchmark(root, n) for n in args.sizes}
    print(
        f"\npeak RSS of unleash evaluate (MiB), --fit-samples {args.fit_samples}, "
        f"--workers {args.workers}, scorers {SCORERS}"
    )
    print(
        f"median of {args.runs} runs [range]; / smallest compares medians\n"
        "| images on disk | ID train / test / OOD | shipped | / smallest | "
        "MALLOC_MMAP_THRESHOLD_=131072 | / smallest |"
    )
    print("|---|---|---|---|---|---|")
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, bench in benches.items():
            cells = []
            for label, env in (("shipped", {}), ("fixed", FIXED_MMAP)):
                runs = []
                for _ in range(args.runs):
                    out = Path(tmp) / f"run{n}"
                    runs.append(peak_rss(bench, out, args.fit_samples, args.workers, env) / MIB)
                    shutil.rmtree(out)
                median = float(np.median(runs))
                first.setdefault(label, median)
                cells += [
                    f"{median:.0f} [{min(runs):.0f}-{max(runs):.0f}]",
                    f"{median / first[label]:.2f}",
                ]
            split = f"{n // 2:,} / {n // 4:,} / {n // 4:,}"
            print(f"| {n + VAL:,} | {split} | " + " | ".join(cells) + " |")

    smallest = load_benchmark(str(benches[args.sizes[0]])).id_test
    model = load_checkpoint("fmnist_cnn", "cpu")[0].eval()
    t = best_of(
        {
            "streamed": lambda: forward_outputs(
                model, smallest, batch_size=args.batch_size, workers=args.workers
            ),
            "plain": lambda: plain_loop(model, smallest.paths, args.batch_size, args.workers),
        },
        args.repeats,
    )
    n = len(smallest)
    print(
        f"\nforward pass over {n:,} JPEGs, batch {args.batch_size}, --workers {args.workers}, "
        f"best of {args.repeats} interleaved"
    )
    print("| loop | time (s) | images/s |")
    print("|---|---|---|")
    for name, seconds in t.items():
        print(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} |")
    print(f"\nstreamed throughput / plain DataLoader throughput: {t['plain'] / t['streamed']:.3f}")


if __name__ == "__main__":
    main()
