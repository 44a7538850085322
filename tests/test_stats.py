"""Blockwise statistics: the same numbers as whole-matrix numpy, in blocks of any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unleash_ood.scores import stats


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 entries, so that every test crosses many block boundaries."""
    monkeypatch.setattr(stats, "BLOCK_ELEMENTS", 64)


def _data(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(300, 7, generator=gen, dtype=dtype),
        torch.randn(500, 9, generator=gen, dtype=dtype).clamp_min(0),  # many tied zeros
        torch.randint(-3, 4, (200, 3), generator=gen).to(dtype),  # ties everywhere
        -torch.rand(40, 1, generator=gen, dtype=dtype) * 1e-30,  # negatives, tiny
        torch.tensor([[-0.0], [0.0], [1.0], [-2.0]], dtype=dtype),  # both zeros
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.0, 1.0, 37.5, 50.0, 90.0, 99.99, 100.0])
def test_percentile_equals_numpy(dtype, q) -> None:
    for values in _data(dtype):
        want = np.percentile(values.double().numpy(), q)
        assert stats.percentile(values, q) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_class_statistics_equal_whole_matrix() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(257, 5, generator=gen)
    y = torch.tensor([7, 2, 9])[torch.randint(0, 3, (257,), generator=gen)]
    classes, means = stats.class_means(x, y)
    xd = x.double().numpy()
    want = np.stack([xd[y.numpy() == c].mean(0) for c in (2, 7, 9)])
    assert classes.tolist() == [2, 7, 9]
    np.testing.assert_allclose(means.numpy(), want, rtol=1e-12)
    centred = xd - means.numpy()[np.searchsorted([2, 7, 9], y.numpy())]
    cov = stats.shared_covariance(x, y, classes, means)
    np.testing.assert_allclose(cov.numpy(), centred.T @ centred / 257, rtol=1e-12)
    origin = torch.rand(5, generator=gen, dtype=torch.float64)
    shifted = xd - origin.numpy()
    moment = stats.second_moment(x, origin)
    np.testing.assert_allclose(moment.numpy(), shifted.T @ shifted / 257, rtol=1e-12)
    np.testing.assert_allclose(stats.column_mean(x).numpy(), xd.mean(0), rtol=1e-12)


def test_row_blocks_are_views_and_cover_every_row() -> None:
    x, y = torch.rand(100, 8), torch.arange(100)
    blocks = list(stats.row_blocks(x, y))
    assert [len(b) for b, _ in blocks] == [8] * 12 + [4]
    assert all(b.data_ptr() == x[i * 8].data_ptr() for i, (b, _) in enumerate(blocks))
    assert torch.equal(stats.block_map(lambda a, b: a.sum(1) + b, x, y), x.sum(1) + y)
