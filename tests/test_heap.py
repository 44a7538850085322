"""glibc's thresholds set for batch buffers unless the environment sets them; HeapCap: the C
heap's free pages go back to the system only when a pass's resident set has grown past its
level after a batch by more than the slack."""

import mmap
import sys

import pytest

from unleash_ood import heap
from unleash_ood.cli import entry as cli


def drive(monkeypatch, resident: list[int], slack: int) -> list[int]:
    """Steps a HeapCap over the resident sizes given; the steps after which it trimmed."""
    read: list[int] = []
    trims: list[int] = []
    monkeypatch.setattr(heap, "_MALLOC_TRIM", lambda pad: trims.append(len(read) - 1) or 1)
    cap = heap.HeapCap(slack)
    monkeypatch.setattr(heap, "resident_bytes", lambda: read.append(0) or resident[len(read) - 1])
    for _ in resident:
        cap.step()
    return trims


def test_no_returns_while_the_heap_is_steady(monkeypatch):
    assert drive(monkeypatch, [500, 520, 510, 540, 550], slack=100) == []


def test_a_return_once_growth_passes_the_slack_then_a_new_level(monkeypatch):
    # level 500 after the first batch; 601 passes it; the level is taken again at 580, so
    # 650 stays within the slack and 681 passes it.
    resident = [500, 560, 601, 580, 650, 681, 600]
    assert drive(monkeypatch, resident, slack=100) == [2, 5]


def test_nothing_where_the_resident_set_cannot_be_read(monkeypatch):
    monkeypatch.setattr(heap, "resident_bytes", lambda: None)
    monkeypatch.setattr(heap, "_MALLOC_TRIM", lambda pad: pytest.fail("trimmed"))
    cap = heap.HeapCap(0)
    cap.step()
    cap.step()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
def test_resident_bytes_reads_this_process():
    before = heap.resident_bytes()
    size = 64 * 2**20
    # Fresh pages from the kernel (the C heap may hold freed resident ones), each written.
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    assert heap.resident_bytes() >= before + 32 * 2**20
    block.close()


def test_reuse_batch_buffers_sets_both_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    assert heap.reuse_batch_buffers(64 * 2**20)
    assert calls == [(-3, 64 * 2**20), (-1, 64 * 2**20)]
    calls.clear()
    assert heap.reuse_batch_buffers(2**40)  # mallopt takes a C int
    assert calls == [(-3, 2**31 - 1), (-1, 2**31 - 1)]


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
    ],
)
def test_reuse_batch_buffers_leaves_the_environment_s_choice(monkeypatch, name, value):
    monkeypatch.setattr(heap, "_MALLOPT", lambda param, value: pytest.fail("mallopt called"))
    monkeypatch.setenv(name, value)
    assert not heap.reuse_batch_buffers()


def test_reuse_batch_buffers_without_mallopt(monkeypatch):
    monkeypatch.setattr(heap, "_MALLOPT", None)
    assert not heap.reuse_batch_buffers()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_batch_buffers_on_this_c_library(monkeypatch):
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    assert heap.reuse_batch_buffers() == (heap._MALLOPT is not None)


def test_every_command_sets_the_allocator_first(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "reuse_batch_buffers", lambda: calls.append(1) or True)
    assert cli.main(["datasets", "--data-dir", str(tmp_path)]) == 0
    assert calls == [1]
