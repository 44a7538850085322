"""The run a workflow is part of, made once at its entry point (the CLI or an API call).

Before, the device was resolved in the command line, carried through every workflow's
positional arguments and only rewritten to the process's own GPU inside the trainer, so
everything before training (xi's estimate, the validation grid) ran on the wrong device on
every rank but the first. :meth:`RunContext.open` joins the ``torchrun`` process group first and
resolves the device after it; workflows take the context instead of long argument lists, and
ask it whether they are the process that writes (:attr:`main`) and to wait for it
(:meth:`barrier`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from unleash_ood.data.base import Benchmark
from unleash_ood.device import Dist, init_distributed, resolve_device
from unleash_ood.errors import UserError


@dataclass(frozen=True)
class RunContext:
    """The benchmark, output folder, device, place in a ``torchrun`` job, progress display and
    data-loading processes of one run. ``workers`` processes decode streamed image files
    (:class:`~unleash_ood.data.streaming.ImageFiles`) in every pass the run makes over data:
    training, validation, xi's estimate, outlier batches, evaluations (0: in the run's own
    process)."""

    benchmark: Benchmark
    out: Path
    device: torch.device
    dist: Dist = field(default_factory=Dist)
    progress: bool = True
    workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise UserError(f"workers must be an integer >= 0, not {self.workers!r}")

    @classmethod
    def open(
        cls,
        benchmark: Benchmark,
        out: str | Path,
        device: str | torch.device = "auto",
        progress: bool = True,
        workers: int = 0,
    ) -> RunContext:
        """Join the process group ``torchrun`` describes (if any), then resolve the device:
        under ``torchrun`` with CUDA each process takes its own GPU."""
        resolved = resolve_device(device) if isinstance(device, str) else torch.device(device)
        dist, resolved = init_distributed(resolved)
        return cls(benchmark, Path(out), resolved, dist, progress, workers)

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.dist.main

    def barrier(self) -> None:
        """Wait for every process, e.g. before reading what the main one wrote."""
        self.dist.barrier()

    def under(self, out: str | Path) -> RunContext:
        """The same run writing into ``out`` (e.g. one candidate of a search)."""
        return replace(self, out=Path(out))

    def on(self, benchmark: Benchmark) -> RunContext:
        """The same run on another view of the data (e.g. the start model's training set)."""
        return replace(self, benchmark=benchmark)
