"""Device choice: cpu / cuda / mps by flag, ``auto`` picks the best available; the process's
place in a ``torchrun`` job; mixed-precision autocast by name."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unleash_ood.errors import UserError

# --autocast names -> the dtype autocast runs eligible ops in (None: plain float32).
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    return device


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype of ``--autocast NAME`` on ``device`` (None for ``none``: float32).

    fp16 is refused on the CPU: it is a GPU format there (no fast kernels, and float16's
    narrow range overflows where bf16 does not); bf16 runs on every device.
    """
    if name not in AUTOCAST:
        raise UserError(f"unknown autocast {name!r}; choose one of: {', '.join(AUTOCAST)}")
    if name == "fp16" and device.type == "cpu":
        raise UserError("--autocast fp16 needs a GPU; on the CPU use --autocast bf16 or none")
    return AUTOCAST[name]


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move an image batch, channels-last: convolutions run 1.4x faster so on a CPU."""
    return x.to(device, memory_format=torch.channels_last, non_blocking=True)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` (in place) to ``device`` with channels-last weights, to match
    :func:`to_device`; the state dict is unchanged, so checkpoints stay portable."""
    return model.to(device, memory_format=torch.channels_last)


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process: after the main one writes files the others then read."""
        if self.world > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_dist(), device


def current_dist() -> Dist:
    """The process group joined so far (by :func:`init_distributed` or the caller's own
    ``init_process_group``), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def _libc_trim():
    """glibc's ``malloc_trim`` from the symbols already loaded in this process, or None where
    the C library has none (macOS, musl) or cannot be opened that way (Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        return None


_MALLOC_TRIM = _libc_trim()


def release_freed_memory() -> None:
    """Hand the pages the C heap holds free back to the system (glibc's ``malloc_trim(0)``).

    A forward pass frees a batch's buffers every step; glibc keeps freed blocks in its heap
    and, once it has raised its mmap threshold, serves later batches from there, where they
    can pile up as fragments. Called after each dataset's pass and each scorer's scoring,
    where a few milliseconds do not count, and within a pass by :class:`HeapCap`.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def resident_bytes() -> int | None:
    """This process's resident set in bytes (``/proc/self/statm``), or None where there is
    no such file (macOS, Windows)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# Growth of the resident set over its level after a batch that HeapCap tolerates.
HEAP_SLACK = 128 * 2**20


class HeapCap:
    """Bounds what a pass's freed batch buffers add to the resident set: call :meth:`step`
    after each batch; once the resident set exceeds its level after the first batch (which
    holds one batch's working set) by more than ``slack`` bytes, the C heap's free pages go
    back to the system (:func:`release_freed_memory`) and the level is taken again after the
    next batch.

    Why not at a fixed interval: returning the pages every 16 batches made the next batch
    fault them in again, 1.17x the time of a plain loop for the evaluator's forward pass
    (2.2 million page faults against 38,000), and the peak was no lower: 80,200 streamed
    images peaked at a median 961-964 MiB in two runs of ``benchmarks/scale.py``, against 874
    with this cap and 1,030 with no returns within a pass. Growth that is data (outputs
    written into their buffers) also crosses the slack now and then; each crossing costs one
    return, so that stays rare.
    Does nothing where the resident set cannot be read or the C library cannot trim.
    """

    def __init__(self, slack: int = HEAP_SLACK):
        self.slack = slack
        self.level: int | None = None

    def step(self) -> None:
        now = resident_bytes() if _MALLOC_TRIM is not None else None
        if now is None:
            return
        if self.level is None:
            self.level = now
        elif now > self.level + self.slack:
            release_freed_memory()
            self.level = None
