"""HeapCap: the C heap's free pages go back to the system only when a pass's resident set
has grown past its level after a batch by more than the slack."""

import sys

import pytest

from unleash_ood import device


def drive(monkeypatch, resident: list[int], slack: int) -> list[int]:
    """Steps a HeapCap over the resident sizes given; the steps after which it trimmed."""
    read: list[int] = []
    trims: list[int] = []
    monkeypatch.setattr(device, "_MALLOC_TRIM", lambda pad: trims.append(len(read) - 1) or 1)
    cap = device.HeapCap(slack)
    monkeypatch.setattr(device, "resident_bytes", lambda: read.append(0) or resident[len(read) - 1])
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
    monkeypatch.setattr(device, "resident_bytes", lambda: None)
    monkeypatch.setattr(device, "_MALLOC_TRIM", lambda pad: pytest.fail("trimmed"))
    cap = device.HeapCap(0)
    cap.step()
    cap.step()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
def test_resident_bytes_reads_this_process():
    before = device.resident_bytes()
    block = b"\x01" * (64 * 2**20)  # written, so its pages are resident
    assert device.resident_bytes() >= before + 32 * 2**20
    del block
