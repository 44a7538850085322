"""Run folders: one command at a time per --out, and an interrupt that says how to go on."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from unleash_ood import train
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.rundir import check_own_folder, holds_files, out_lock

TINY = ["--model-arg", "width=4", "--batch-size", "64", "--no-progress", "--device", "cpu"]


def test_a_second_command_into_a_locked_folder_is_refused(
    capsys, fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    out = tmp_path / "out"
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(fmnist_dir)]
    with out_lock(out):
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("wait for it to finish or choose another folder")
        assert not holds_files(out)
    assert not out.exists()  # made by the lock, left empty, removed with it
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.json").is_file() and not (out / ".lock").exists()


def test_a_killed_command_leaves_no_stale_lock(tmp_path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from unleash_ood.rundir import out_lock\n"
            f"with out_lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match="another unleash command"), out_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with out_lock(out):  # the system dropped the dead process's lock
        (out / "result.txt").write_text("kept")
    assert (out / "result.txt").read_text() == "kept" and not (out / ".lock").exists()


def test_ctrl_c_during_training_says_resume_continues(
    capsys, fmnist_dir, monkeypatch, tmp_path
) -> None:
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "fit", interrupted)
    argv = ["pretrain", "--data-dir", str(fmnist_dir), "--epochs", "1", *TINY]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("unleash pretrain: interrupted; rerun it with --resume")


def test_ctrl_c_during_evaluation_says_only_interrupted(
    capsys, fmnist_dir, tiny_checkpoint, monkeypatch, tmp_path
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("unleash_ood.evaluate"), "evaluate", interrupted)
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(fmnist_dir)]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "unleash evaluate: interrupted"
    assert not (tmp_path / "out").exists()


def test_only_run_folders_or_an_interrupted_first_start_are_written_into(tmp_path) -> None:
    check_own_folder(tmp_path / "absent")
    check_own_folder(tmp_path)  # empty
    (tmp_path / "log.txt").write_text("xi: mask 1/5\n")  # a finetune stopped choosing xi
    (tmp_path / "xi_search").mkdir()
    (tmp_path / ".lock").touch()  # left by a killed command
    check_own_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(UserError, match=r"did not write \(config.json\); choose a new"):
        check_own_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"command": "finetune"}')
    check_own_folder(tmp_path)  # a run of this library: the commands check the rest
    (tmp_path / "config.json").write_text("[not a record")
    with pytest.raises(UserError, match=r"RUN .* did not write"):
        check_own_folder(tmp_path, "RUN")
