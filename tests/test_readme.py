"""The README's set-up commands have the shape a fresh Debian/Ubuntu needs, and its Python and
command-line examples run as written (on the small generated Fashion-MNIST, with training
commands cut to one epoch so the suite stays short)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unleash_ood.cli import main
from unleash_ood.scores import SCORERS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TRAINING = ("pretrain", "finetune", "watermark")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_setup_commands() -> None:
    first = code_blocks("sh")[0].strip().splitlines()
    assert len(first) == 2 and first[1] == "bash .ci/run"
    steps = [s.strip() for s in first[0].split("&&")]
    assert steps[0] == "apt-get update"
    assert steps[1].startswith("apt-get install -y ") and "python3-venv" in steps[1]
    # Debian's and Ubuntu's own Python is externally managed: never pip outside a venv.
    assert "python3 -m venv .venv" in steps
    assert all(not s.startswith(("pip ", "python3 -m pip")) for s in steps)
    assert steps[-2] == ".venv/bin/pip install -e ." and steps[-1] == ".venv/bin/unleash demo"


def test_ci_installs_as_the_readme_does() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "/usr/bin/python3 -m venv .venv" in ci and "python3-venv" in ci
    assert ".venv/bin/pip install -q -e" in ci and ".venv/bin/python -m pytest" in ci


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch, fmnist_dir, tiny_checkpoint) -> Path:
    """An empty working directory whose data is the small generated Fashion-MNIST and whose
    named models (``fmnist_cnn`` and its fine-tunes) are the tiny test checkpoint, found
    through ``$UNLEASH_WEIGHTS`` before the shipped ones: the commands run as written, on a
    model and data small enough for the suite."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("fmnist_cnn", "fmnist_cnn_ce", "fmnist_cnn_um", "fmnist_cnn_umap"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(tiny_checkpoint.with_suffix(suffix), weights / f"{name}{suffix}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("UNLEASH_DATA", str(fmnist_dir))
    monkeypatch.setenv("UNLEASH_WEIGHTS", str(weights))
    monkeypatch.setattr("unleash_ood.data.base.SYSTEM_DATA_ROOTS", ())
    return work


def test_python_example_runs(in_tmp_cwd) -> None:
    (example,) = code_blocks("python")
    code = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, check=False
    )
    assert code.returncode == 0, code.stderr
    assert "'auroc'" in code.stdout and "'fpr95_id'" in code.stdout


def command_lines() -> list[list[str]]:
    """Every ``unleash`` line of the README's command-line section, as argv."""
    block = code_blocks("sh")[1]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("unleash ")]


def test_command_line_examples_run_in_order(in_tmp_cwd, capsys) -> None:
    argvs = command_lines()
    assert {a[0] for a in argvs} >= {"datasets", "evaluate", "finetune", "pretrain", "track"}
    for argv in argvs:
        extra = ["--epochs", "1", "--no-progress"] if argv[0] in TRAINING else []
        code = main([*argv, *extra])
        assert code == 0, (argv, capsys.readouterr().err)
    # `evaluate --scores all`: every scorer, end to end through the command
    rows = json.loads((in_tmp_cwd / "runs" / "eval" / "metrics.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} == set(SCORERS)
    ranking = (in_tmp_cwd / "runs" / "eval" / "metrics.md").read_text()
    assert f"| {len(SCORERS)} |" in ranking
    assert (in_tmp_cwd / "runs" / "cnn" / "track.csv").exists()
    assert (in_tmp_cwd / "runs" / "oe-um" / "checkpoints" / "final.json").exists()
