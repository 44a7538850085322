"""Start-up cost of the command line: ``unleash --help`` (and every sub-command's help)
against ``python -c pass``, wall time and peak memory, measured in one run.

    python benchmarks/cli_startup.py [--repeats 5]

Each command runs as a fresh child process; its peak resident memory is the child's
``ru_maxrss``. Wall times are the minimum over interleaved repeats. Target: help under 1 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

COMMANDS = ["datasets", "evaluate", "pretrain", "finetune", "atypical", "demo", "track"]


def run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
        "print(time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    wall, rss = out.stdout.split()
    return float(wall), float(rss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cases = {"python -c pass": [sys.executable, "-c", "pass"]}
    cases["unleash --help"] = [sys.executable, "-m", "unleash_ood", "--help"]
    for c in COMMANDS:
        cases[f"unleash {c} --help"] = [sys.executable, "-m", "unleash_ood", c, "--help"]
    best = {k: (float("inf"), 0.0) for k in cases}
    for _ in range(args.repeats):
        for name, argv in cases.items():
            wall, rss = run(argv)
            best[name] = (min(best[name][0], wall), max(best[name][1], rss))
    base_wall, base_rss = best["python -c pass"]
    print("| command | wall (s) | peak RSS (MiB) | wall / python -c pass | RSS / python -c pass |")
    print("|---|---|---|---|---|")
    for name, (wall, rss) in best.items():
        print(
            f"| `{name}` | {wall:.3f} | {rss:.0f} | {wall / base_wall:.2f} | {rss / base_rss:.2f} |"
        )


if __name__ == "__main__":
    main()
