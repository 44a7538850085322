"""Training: the loop, per-epoch tracking, exact resume after SIGKILL, torchrun DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TORCHRUN
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.data import load_benchmark
from unleash_ood.track import Tracker
from unleash_ood.train import Recipe

TINY = [
    "--model-arg",
    "width=4",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--no-progress",
    "--device",
    "cpu",
]


def env_for(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ, UNLEASH_DATA=str(data_dir), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"{name}.safetensors"))


def test_schedules() -> None:
    r = Recipe(lr=0.1, epochs=8, schedule="step")
    assert [r.lr_at(e) for e in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    # WOODS / SCONE: MultiStepLR(milestones=[int(.5 E), int(.75 E), int(.9 E)], gamma=0.5)
    h = Recipe(lr=0.001, epochs=10, schedule="halving")
    assert [h.lr_at(e) for e in (0, 4, 5, 6, 7, 8, 9)] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4]
    )
    c = Recipe(lr=0.1, epochs=4, schedule="cosine")
    assert [c.lr_at(e) for e in range(4)] == pytest.approx(
        [0.1, 0.0853553, 0.05, 0.0146447], abs=1e-6
    )


def test_pretrain_with_tracking_writes_run(capsys, fmnist_dir, tmp_path) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "--data-dir",
            str(fmnist_dir),
            "--epochs",
            "2",
            "--out",
            str(run),
            "--track",
            *TINY,
        ]
    )
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"epoch_001.safetensors", "epoch_002.json", "last.json"} <= names
    meta = json.loads((run / "checkpoints" / "epoch_002.json").read_text())
    assert meta["epoch"] == 2 and meta["recipe"]["epochs"] == 2 and meta["benchmark"] == "fmnist"
    with open(run / "track.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["epoch"] for r in rows} == {"1", "2"}
    assert {r["split"] for r in rows} == {"val", "test"}
    assert {r["scorer"] for r in rows} == {"energy", "msp"}
    assert (run / "track.png").read_bytes()[:4] == b"\x89PNG"
    selection = json.loads((run / "track_selection.json").read_text())
    assert selection["selected_epoch"] in (1, 2)

    # Tracking afterwards gives the same rows as tracking during training.
    during = (run / "track.csv").read_text()
    (run / "track.csv").unlink()
    assert (
        main(["track", str(run), "--data-dir", str(fmnist_dir), "--device", "cpu", "--no-progress"])
        == 0
    )
    assert (run / "track.csv").read_text() == during

    # A run stopped after saving epoch 1 but before tracking it, then resumed: tracking
    # epoch 2 first catches up on epoch 1.
    header, *lines = during.splitlines(keepends=True)
    (run / "track.csv").write_text(header + "".join(x for x in lines if not x.startswith("1,")))
    bench = load_benchmark("fmnist", str(fmnist_dir))
    tracker = Tracker(bench, "energy,msp", run, torch.device("cpu"), progress=False)
    model, meta = load_checkpoint(run / "checkpoints" / "epoch_002")
    tracker(2, model, meta["metrics"])
    assert (run / "track.csv").read_text() == during


def test_refuses_to_overwrite_a_run(capsys, fmnist_dir, tmp_path) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--data-dir", str(fmnist_dir), "--epochs", "1", "--out", str(run), *TINY]
    assert main(args) == 0
    before = weights(run)
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in weights(run).items())


def _pretrain_cmd(data_dir: Path, run: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "unleash_ood",
        "pretrain",
        "--data-dir",
        str(data_dir),
        "--epochs",
        str(epochs),
        "--out",
        str(run),
        *TINY,
        *extra,
    ]


def test_resume_after_sigkill_matches_uninterrupted_run(fmnist_dir, tmp_path) -> None:
    epochs = 5
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_pretrain_cmd(fmnist_dir, whole, epochs), check=True, env=env_for(fmnist_dir))

    proc = subprocess.Popen(_pretrain_cmd(fmnist_dir, killed, epochs), env=env_for(fmnist_dir))
    last = killed / "checkpoints" / "last.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and json.loads(last.read_text())["epoch"] >= 2:
            break  # epoch 3 has just begun: kill it part-way through
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last_epoch = json.loads((killed / "checkpoints" / "last.json").read_text())["epoch"]
    assert 2 <= last_epoch < epochs, "the run was not interrupted mid-way"

    subprocess.run(
        _pretrain_cmd(fmnist_dir, killed, epochs, "--resume"), check=True, env=env_for(fmnist_dir)
    )
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_agree_with_single_process(fmnist_dir, tmp_path) -> None:
    """Same global batch over 2 gloo processes. BatchNorm then normalises each half-batch with
    its own statistics, so the runs differ slightly; the test bounds that difference."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ["pretrain", "--data-dir", str(fmnist_dir), "--epochs", "2", *TINY]
    subprocess.run(
        [sys.executable, "-m", "unleash_ood", *args, "--out", str(single)],
        check=True,
        env=env_for(fmnist_dir),
    )
    subprocess.run(
        [*TORCHRUN, "-m", "unleash_ood", *args, "--out", str(ddp)],
        check=True,
        env=env_for(fmnist_dir),
        timeout=300,
    )
    meta_s = json.loads((single / "checkpoints" / "last.json").read_text())["metrics"]
    meta_d = json.loads((ddp / "checkpoints" / "last.json").read_text())["metrics"]
    assert abs(meta_s["val_acc"] - meta_d["val_acc"]) < 0.05
    assert abs(meta_s["train_loss"] - meta_d["train_loss"]) < 0.1 * meta_s["train_loss"]
    a, b = weights(single), weights(ddp)
    w = "trunk.0.weight"
    assert (a[w] - b[w]).norm() / a[w].norm() < 0.1
