"""The C heap under a forward pass: glibc's allocator settings for batch buffers, returning
its free pages to the system, and this process's resident set. Imports nothing heavy, so that
the command line sets the allocator before PyTorch allocates anything."""

from __future__ import annotations

import ctypes
import os


def _libc_function(name: str):
    """A glibc function from the symbols already loaded in this process, or None where the C
    library has none (macOS, musl) or cannot be opened that way (Windows)."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the C heap, and freed ones stay there for the next batch.
HEAP_BLOCKS = 256 * 2**20


def reuse_batch_buffers(limit: int = HEAP_BLOCKS) -> bool:
    """Let glibc serve a batch's large buffers from the blocks the previous batch freed,
    instead of mapping them afresh (sets its mmap and trim thresholds to ``limit`` bytes).

    With glibc's defaults, a block above its mmap threshold (at most 32 MiB, raised as mapped
    blocks are freed) is mapped when the heap holds no free block as large, and unmapped when
    freed: the CNN's first activation (51 MB at batch 512) then costs a fresh mapping whose
    pages the kernel zeroes on every batch. On the shipped model's evaluation (81,293 images,
    2 cores) that was 4.3-7.8 million page faults and 21-25 s per pass in the heap's bad
    state; with this setting 300-55,000 faults and 16.4-16.6 s, for a plain loop and
    ``forward_outputs`` alike. The price is the freed buffers kept for the next batch: the
    peak resident set of a streamed evaluation rose by about 50-80 MiB
    (``benchmarks/scale.py``) and stays flat in the data's size, since :class:`HeapCap` and
    :func:`release_freed_memory` still return free pages.
    The command line calls it at start; library users may call it once themselves, since it
    changes the whole process's allocator. Does nothing, and returns False, where the C
    library has no ``mallopt`` or the environment already sets these thresholds.
    """
    if _MALLOPT is None or _thresholds_from_environment():
        return False
    limit = min(limit, 2**31 - 1)  # mallopt takes a C int
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, limit)) and bool(_MALLOPT(_M_TRIM_THRESHOLD, limit))


def _thresholds_from_environment() -> bool:
    """Whether the user set glibc's mmap or trim threshold in the environment (their choice
    stands)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (
        "MALLOC_MMAP_THRESHOLD_" in os.environ
        or "MALLOC_TRIM_THRESHOLD_" in os.environ
        or "mmap_threshold" in tunables
        or "trim_threshold" in tunables
    )


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
    with this cap and 1,030 with no returns within a pass (glibc's default thresholds; 951
    with this cap under :func:`reuse_batch_buffers`). Growth that is data (outputs
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
