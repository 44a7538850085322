"""The run context: made once, device resolved after joining the process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unleash_ood.context import RunContext
from unleash_ood.device import Dist
from unleash_ood.errors import UserError


def test_open_resolves_the_device_in_a_single_process(tiny_benchmark, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = RunContext.open(tiny_benchmark, tmp_path / "run", "cpu", progress=False)
    assert ctx.device == torch.device("cpu") and ctx.dist == Dist() and ctx.main
    assert ctx.out == tmp_path / "run" and not ctx.progress
    ctx.barrier()  # a single process never waits
    moved = ctx.under(tmp_path / "candidate")
    assert moved.out == tmp_path / "candidate" and moved.benchmark is ctx.benchmark
    assert ctx.on(tiny_benchmark).out == ctx.out


def test_a_rank_other_than_zero_is_not_main(tiny_benchmark) -> None:
    ctx = RunContext(tiny_benchmark, Path("run"), torch.device("cpu"), Dist(rank=1, world=2))
    assert not ctx.main


def test_an_unknown_device_is_refused(tiny_benchmark, tmp_path) -> None:
    with pytest.raises(UserError, match="unknown device"):
        RunContext.open(tiny_benchmark, tmp_path, "gpu7")
