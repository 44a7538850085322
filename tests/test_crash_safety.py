"""A training run killed between any two writes of a checkpoint save is continued by
``--resume`` to the same weights as a run that was never interrupted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unleash_ood.cli import main

ARGS = ["--model-arg", "width=4", "--batch-size", "64", "--lr", "0.05", "--no-progress"]


class Crash(BaseException):
    """Stands for the process dying: nothing catches it, nothing after it runs."""


def pretrain(data_dir: Path, run: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "3",
        "--out",
        str(run),
        *ARGS,
        *extra,
    ]


def record_writes(monkeypatch, crash_after: int | None = None) -> list[str]:
    """Log every file operation in a ``checkpoints`` folder (atomic replace, unlink) by target
    name; raise :class:`Crash` right after operation number ``crash_after``."""
    done: list[str] = []
    real_replace, real_unlink = os.replace, Path.unlink

    def step(op: str, path: Path) -> None:
        if path.parent.name != "checkpoints":
            return  # e.g. the data cache, written by the first run only
        done.append(f"{op} {path.name}")
        if crash_after is not None and len(done) == crash_after:
            raise Crash

    def replace(src, dst):
        real_replace(src, dst)
        step("replace", Path(dst))

    def unlink(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        step("unlink", self)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    return done


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last.safetensors"))


def test_resume_after_a_crash_at_every_step_of_a_save(fmnist_dir, tmp_path) -> None:
    straight = tmp_path / "straight"
    with pytest.MonkeyPatch.context() as mp:
        ops = record_writes(mp)
        assert main(pretrain(fmnist_dir, straight)) == 0
    expected = final_weights(straight)
    # The operations of epoch 2's save: from its first write up to the next epoch's.
    first = ops.index("replace epoch_002.safetensors")
    last = ops.index("replace epoch_003.safetensors")
    save_ops = ops[first:last]
    assert save_ops[:3] == [
        "replace epoch_002.safetensors",
        "replace epoch_002.json",
        "replace train_state_002.safetensors",
    ]
    assert "unlink train_state_001.safetensors" in save_ops
    for k in range(first, last + 1):  # crash right after operation k (k = first: before any)
        run = tmp_path / f"crash{k}"
        with pytest.MonkeyPatch.context() as mp:
            record_writes(mp, crash_after=k)
            with pytest.raises(Crash):
                main(pretrain(fmnist_dir, run))
        assert main(pretrain(fmnist_dir, run, "--resume")) == 0, ops[k - 1]
        got = final_weights(run)
        assert all(torch.equal(expected[name], got[name]) for name in expected), ops[k - 1]


def test_a_run_killed_before_its_first_save_starts_afresh(fmnist_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        ops = record_writes(mp, crash_after=None)
        assert main(pretrain(fmnist_dir, tmp_path / "probe")) == 0
    torn = ops.index("replace epoch_001.json")  # weights of epoch 1 written, its sidecar not
    with pytest.MonkeyPatch.context() as mp:
        record_writes(mp, crash_after=torn)
        with pytest.raises(Crash):
            main(pretrain(fmnist_dir, run))
    assert main(pretrain(fmnist_dir, run, "--resume")) == 2
    assert "holds no run to resume; drop --resume" in capsys.readouterr().err
    assert main(pretrain(fmnist_dir, run)) == 0
    assert final_weights(run).keys() == final_weights(tmp_path / "probe").keys()
