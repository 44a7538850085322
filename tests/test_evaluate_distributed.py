"""``torchrun -m unleash_ood evaluate``: shards forwarded per process, gathered in order, the
same metrics as one process, files written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import TORCHRUN


def evaluate_argv(fmnist_dir, ckpt, out) -> list[str]:
    # msp: plain outputs; mahalanobis: fitted on the gathered training outputs; odin: a
    # gradient scorer, whose scores are sharded and gathered on their own; mode: feature-map
    # summaries, gathered like the outputs.
    return [
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--data-dir",
        str(fmnist_dir),
        "--scores",
        "msp,mahalanobis,odin,mode",
        "--batch-size",
        "128",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]


def test_two_processes_give_the_metrics_of_one(fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    module = [sys.executable, "-m", "unleash_ood"]
    subprocess.run(
        [*module, *evaluate_argv(fmnist_dir, tiny_checkpoint, single)],
        env=env,
        check=True,
        timeout=300,
    )
    run = subprocess.run(
        [*TORCHRUN, "-m", "unleash_ood", *evaluate_argv(fmnist_dir, tiny_checkpoint, ddp)],
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    a = json.loads((single / "metrics.json").read_text())
    b = json.loads((ddp / "metrics.json").read_text())
    assert a["accuracy"] == b["accuracy"]
    assert len(a["rows"]) == len(b["rows"]) > 0
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, float):
                assert abs(value - rb[key]) < 1e-9, (ra["scorer"], ra["dataset"], key)
            else:
                assert value == rb[key]
    assert json.loads((ddp / "config.json").read_text())["processes"] == 2
    assert run.stdout.count("Full tables and plots in") == 1  # only rank 0 reports
    assert (ddp / "log.txt").read_text().count("unleash evaluate") == 1
