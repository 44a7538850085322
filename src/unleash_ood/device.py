"""Device choice: cpu / cuda / mps by flag, ``auto`` picks the best available; the process's
place in a ``torchrun`` job; mixed-precision autocast by name."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unleash_ood.errors import UserError
from unleash_ood.heap import HeapCap, release_freed_memory, resident_bytes

__all__ = [
    "AUTOCAST",
    "Dist",
    "HeapCap",  # the C heap's helpers live in unleash_ood.heap; importable here as before
    "autocast_dtype",
    "current_dist",
    "init_distributed",
    "prepare_model",
    "release_freed_memory",
    "resident_bytes",
    "resolve_device",
    "to_device",
]

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
