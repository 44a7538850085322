"""How fitted scorers grow with the ID training set: fit + score time, k-NN time per bank
row, fitting memory.

    python benchmarks/scorer_growth.py [--rows 50000 200000 1000000] [--queries 2048]

On synthetic 512-dim features (uniform, a fifth of them zero, as after a ReLU; ten classes):
- Fit on each training size plus score of ``--queries`` queries, for knn, Mahalanobis, ViM
  and ReAct, best of ``--repeats`` (the scorers interleaved).
- k-NN score time of ``--queries`` queries against banks of each size, divided by the bank
  size: a search linear in the bank keeps this flat. The sizes run interleaved, best of
  ``--repeats``, so a busy spell of a shared machine hits them alike.
- Peak memory of fitting Mahalanobis, ViM, ReAct and DICE, and of the k-NN score, beyond the
  inputs: each measured in a fresh child process as its peak resident set size during the call
  (Linux: the high-water mark of /proc/self/status, reset through /proc/self/clear_refs just
  before it) minus its resident size just before it. Memory does not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import best_of
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores import make_scorer

DIM, CLASSES, SEED = 512, 10, 0
MEMORY_CASES = ("knn", "mahalanobis", "vim", "react", "dice", "knn_score")
TIMED = ("knn", "mahalanobis", "vim", "react")
MIB = 2**20


def features(n: int, seed: int) -> torch.Tensor:
    """``(n, DIM)`` float32 in [0, 0.8), a fifth exact zeros, built in place (no temporaries)."""
    x = torch.rand(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x.sub_(0.2).clamp_(min=0)


def head() -> nn.Linear:
    torch.manual_seed(SEED)
    return nn.Linear(DIM, CLASSES)


def outputs(x: torch.Tensor, fc: nn.Linear) -> Outputs:
    with torch.no_grad():
        logits = fc(x)
    return Outputs(x, logits, logits.argmax(1))


def status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def measure_memory(case: str, rows: int, queries: int) -> dict:
    """Peak bytes beyond the inputs of one fit (or the k-NN score), in this process, after the
    same call on 4,000 rows has loaded every library it touches."""
    fc = head()
    name = "knn" if case == "knn_score" else case
    warm = make_scorer(name).fit(outputs(features(4000, SEED), fc), fc)
    if case == "knn_score":
        warm.score(outputs(features(64, SEED), fc), fc)
        # The fitted bank (unit rows) is the input here, normalised in place rather than by
        # fit, whose copy would set a peak that hides the score's.
        warm.bank_ = F.normalize(bank := features(rows, SEED), dim=1, out=bank)
        test = outputs(features(queries, SEED + 1), fc)
        run = lambda: warm.score(test, fc)  # noqa: E731
    else:
        train = outputs(features(rows, SEED), fc)
        run = lambda: make_scorer(name).fit(train, fc)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size to the current one
    before = status_bytes("VmRSS")
    run()
    return {"case": case, "rows": rows, "extra": status_bytes("VmHWM") - before}


def memory_table(rows: list[int], queries: int) -> None:
    print(f"\npeak memory beyond the inputs (MiB); features are {DIM * 4 / 1024:.0f} KiB a row")
    print("| case | " + " | ".join(f"{n:,} rows" for n in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for case in MEMORY_CASES:
        cells = []
        for n in rows:
            cmd = [sys.executable, __file__, "--child", case, str(n), "--queries", str(queries)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
            cells.append(f"{result['extra'] / MIB:.0f}")
        print(f"| {case} | " + " | ".join(cells) + " |")


def fit_score_timing(rows: list[int], queries: int, repeats: int) -> None:
    fc = head()
    test = outputs(features(queries, SEED + 1), fc)
    times = {}
    for n in rows:
        train = outputs(features(n, SEED), fc)
        fns = {
            name: (lambda name=name, t=train: make_scorer(name).fit(t, fc).score(test, fc))
            for name in TIMED
        }
        times[n] = best_of(fns, repeats)
        del train
    print(f"\nfit on the training rows + score of {queries:,} queries (s), best of {repeats}")
    print("| scorer | " + " | ".join(f"{n:,} rows" for n in rows) + " | largest / smallest |")
    print("|---|" + "---|" * (len(rows) + 1))
    for name in TIMED:
        cells = [f"{times[n][name]:.2f}" for n in rows]
        growth = times[rows[-1]][name] / times[rows[0]][name]
        print(f"| {name} | " + " | ".join(cells) + f" | {growth:.1f} |")


def knn_timing(rows: list[int], queries: int, repeats: int) -> None:
    fc = head()
    bank = features(max(rows), SEED)
    test = outputs(features(queries, SEED + 1), fc)
    scorers = {n: make_scorer("knn").fit(outputs(bank[:n], fc), fc) for n in rows}
    del bank
    t = best_of({n: (lambda s=s: s.score(test, fc)) for n, s in scorers.items()}, repeats)
    first = rows[0]
    print(f"k-NN (k=50) score of {queries:,} queries, {DIM}-dim, best of {repeats} interleaved")
    print("| bank rows | time (s) | per bank row (us) | per row / per row at the smallest |")
    print("|---|---|---|---|")
    for n in rows:
        per_row = t[n] / n
        ratio = per_row / (t[first] / first)
        print(f"| {n:,} | {t[n]:.2f} | {1e6 * per_row:.2f} | {ratio:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip", choices=("time", "memory"), default=None)
    p.add_argument("--child", nargs=2, metavar=("CASE", "ROWS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_memory(args.child[0], int(args.child[1]), args.queries)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {Path(__file__).name}")
    if args.skip != "time":
        knn_timing(args.rows, args.queries, args.repeats)
        fit_score_timing(args.rows, args.queries, args.repeats)
    if args.skip != "memory":
        memory_table(args.rows, args.queries)


if __name__ == "__main__":
    main()
