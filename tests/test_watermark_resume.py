"""`unleash watermark --resume`: Ctrl-C or a crash mid-save, then --resume, gives the pattern
and model of a run never interrupted, bit for bit; folders it cannot resume are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import watermark_argv
from unleash_ood.cli import main
from unleash_ood.method import watermark

EPOCHS = 3


def argv(fmnist_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return watermark_argv(
        fmnist_dir, ckpt, out, "--epochs", str(EPOCHS), "--batch-size", "256", *extra
    )


def interrupt_at_epoch(monkeypatch, stop: int):
    """Ctrl-C as (0-based) epoch ``stop`` starts; returns what lets training run on again."""
    real = watermark.watermark_epoch

    def interrupted(model, train, spec, w, epoch, device):
        if epoch == stop:
            raise KeyboardInterrupt
        return real(model, train, spec, w, epoch, device)

    monkeypatch.setattr(watermark, "watermark_epoch", interrupted)
    return lambda: monkeypatch.setattr(watermark, "watermark_epoch", real)


class Crash(BaseException):
    """Stands for the process dying: nothing catches it, nothing after it runs."""


def same_results(a: Path, b: Path) -> bool:
    files = ("watermark.safetensors", "checkpoints/final.safetensors")
    for name in files:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def test_interrupted_and_resumed_equals_uninterrupted(
    capsys, monkeypatch, fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(argv(fmnist_dir, tiny_checkpoint, straight)) == 0, capsys.readouterr().err
    let_run = interrupt_at_epoch(monkeypatch, 2)
    assert main(argv(fmnist_dir, tiny_checkpoint, resumed)) == 130
    assert "rerun it with --resume" in capsys.readouterr().err
    state = load_file(str(resumed / "checkpoints" / "watermark_state.safetensors"))
    assert state["epoch"].tolist() == [2] and not (resumed / "watermark.safetensors").exists()
    let_run()
    code = main(argv(fmnist_dir, tiny_checkpoint, resumed, "--resume"))
    assert code == 0, capsys.readouterr().err
    assert same_results(straight, resumed)
    log = (resumed / "log.txt").read_text()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("epoch")] == [
        "1",
        "2",
        "3",
    ]


def test_a_crash_while_saving_keeps_the_previous_epoch(
    capsys, monkeypatch, fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(argv(fmnist_dir, tiny_checkpoint, straight)) == 0, capsys.readouterr().err
    real_replace, saves = os.replace, []

    def replace(src, dst):  # the process dies as epoch 2's state replaces epoch 1's
        if Path(dst).name == "watermark_state.safetensors":
            saves.append(dst)
            if len(saves) == 2:
                raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        main(argv(fmnist_dir, tiny_checkpoint, crashed))
    monkeypatch.setattr(os, "replace", real_replace)
    state = load_file(str(crashed / "checkpoints" / "watermark_state.safetensors"))
    assert len(saves) == 2 and state["epoch"].tolist() == [1]
    code = main(argv(fmnist_dir, tiny_checkpoint, crashed, "--resume"))
    assert code == 0, capsys.readouterr().err
    assert same_results(straight, crashed)


def test_folders_that_cannot_be_resumed_are_refused(
    capsys, monkeypatch, fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    def refused(out: Path, message: str, *extra: str) -> None:
        assert main(argv(fmnist_dir, tiny_checkpoint, out, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    fresh = tmp_path / "fresh"
    refused(fresh, "no interrupted watermark run", "--resume")
    assert not fresh.exists()

    stopped = tmp_path / "stopped"
    let_run = interrupt_at_epoch(monkeypatch, 1)
    assert main(argv(fmnist_dir, tiny_checkpoint, stopped)) == 130
    capsys.readouterr()
    let_run()
    before = {p: p.read_bytes() for p in stopped.rglob("*") if p.is_file()}
    refused(stopped, "pass --resume")
    refused(stopped, "differ from the flags", "--resume", "--alpha", "0.02")
    assert {p: p.read_bytes() for p in stopped.rglob("*") if p.is_file()} == before
    state = stopped / "checkpoints" / "watermark_state.safetensors"
    state.write_bytes(b"not safetensors")
    refused(stopped, "not a readable safetensors file", "--resume")

    done = tmp_path / "done"
    assert main(argv(fmnist_dir, tiny_checkpoint, done, "--epochs", "1")) == 0
    refused(done, "finished watermark run", "--epochs", "1", "--resume")
    refused(done, "already holds results", "--epochs", "1")


def test_a_run_stopped_before_its_first_epoch_starts_afresh(
    capsys, monkeypatch, fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    out = tmp_path / "early"
    let_run = interrupt_at_epoch(monkeypatch, 0)
    assert main(argv(fmnist_dir, tiny_checkpoint, out, "--epochs", "1")) == 130
    capsys.readouterr()
    let_run()
    assert (out / "config.json").exists() and not (out / "checkpoints").exists()
    assert main(argv(fmnist_dir, tiny_checkpoint, out, "--epochs", "1", "--resume")) == 2
    assert "drop --resume" in capsys.readouterr().err
    assert main(argv(fmnist_dir, tiny_checkpoint, out, "--epochs", "1")) == 0
    assert (out / "checkpoints" / "final.safetensors").exists()
