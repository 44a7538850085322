"""Statistics of ID training features in bounded memory: one row block at a time.

Scorers that fit on the training outputs need ``D x D`` statistics (a covariance, a second
moment) or one number (a percentile) of an ``N x D`` matrix. Converting the whole matrix to
float64, centring it or sorting a copy of it costs several times the features themselves (more
than 12 GiB for a million 512-dim rows). Here every pass reads the features in blocks of about
``BLOCK_ELEMENTS`` entries, so the memory beyond the inputs is ``O(D^2)`` plus one block,
whatever ``N``. Sums are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

# Entries of one row block: 8 MiB once converted to float64.
BLOCK_ELEMENTS = 2**20
# Bits of the key read per pass of the percentile's radix selection.
_DIGIT_BITS = 16


def row_blocks(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The same row blocks (views, no copies) of tensors that share their first dimension,
    each block holding about ``BLOCK_ELEMENTS`` entries of the widest tensor."""
    width = max(t[0].numel() if len(t) else 1 for t in tensors)
    rows = max(1, BLOCK_ELEMENTS // max(width, 1))
    yield from zip(*(t.split(rows) for t in tensors), strict=True)


def block_sum(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``sum(fn(*block))`` over the row blocks of ``tensors``."""
    total = None
    for block in row_blocks(*tensors):
        part = fn(*block)
        total = part if total is None else total.add_(part)
    return total


def block_map(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each row block of ``tensors``, the results concatenated."""
    return torch.cat([fn(*block) for block in row_blocks(*tensors)])


def class_means(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct labels ``(C,)`` and the float64 mean feature of each ``(C, D)``."""
    classes = torch.unique(labels)

    def sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(classes, y)
        return x.new_zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(
            0, index, x.double()
        )

    counts = torch.bincount(torch.searchsorted(classes, labels), minlength=len(classes))
    return classes, block_sum(sums, features, labels) / counts.double()[:, None]


def shared_covariance(
    features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, means: torch.Tensor
) -> torch.Tensor:
    """``sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T / N``, the class-centred (tied) covariance,
    in float64; ``classes`` and ``means`` as :func:`class_means` returns them."""

    def scatter(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        centred = x.double() - means[torch.searchsorted(classes, y)]
        return centred.T @ centred

    return block_sum(scatter, features, labels) / len(features)


def second_moment(features: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """``sum_i (x_i - o)(x_i - o)^T / N`` about a fixed origin ``o``, in float64."""

    def scatter(x: torch.Tensor) -> torch.Tensor:
        shifted = x.double() - origin
        return shifted.T @ shifted

    return block_sum(scatter, features) / len(features)


def squared_mahalanobis(x: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """``(x - mu_k)^T P (x - mu_k)`` for every row of ``x`` ``(N, D)`` and mean ``(K, D)``,
    expanded so that no ``(N, K, D)`` tensor is made."""
    x_p = x @ prec
    return (x_p * x).sum(1, keepdim=True) - 2 * x_p @ means.T + ((means @ prec) * means).sum(1)


def column_mean(features: torch.Tensor) -> torch.Tensor:
    """The float64 mean of each column ``(D,)``."""
    return block_sum(lambda x: x.double().sum(0), features) / len(features)


def _flip(bits: torch.Tensor) -> torch.Tensor:
    """Flip every bit but the sign of negative integers: maps float bit patterns to signed
    integers in the float order and back (it is its own inverse)."""
    width = 8 * bits.element_size()
    return bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))


def _ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """Signed integers in the same order as the float ``values`` (one per entry, same width);
    ``-0.0`` becomes ``+0.0`` first, so equal floats have equal keys."""
    flat = values.reshape(-1) + 0.0
    return _flip(flat.view(torch.int64 if values.element_size() == 8 else torch.int32))


def _select(values: torch.Tensor, rank: int) -> tuple[float, int]:
    """The ``rank``-th smallest entry (0-based) of ``values`` and how many entries are at most
    that value, by radix selection on the ordered bit patterns, 16 bits per pass.

    Each pass counts, over row blocks, the next digit of the keys that share the digits already
    fixed; the first pass shifts the signed top digit to be non-negative so that the digit
    order is the key order.
    """
    width = 8 * values.element_size()
    top = width - _DIGIT_BITS
    prefix, below = 0, 0
    for shift in range(top, -1, -_DIGIT_BITS):
        counts = np.zeros(2**_DIGIT_BITS, dtype=np.int64)
        for (block,) in row_blocks(values):
            keys = _ordered_keys(block)
            if shift == top:
                digits = (keys >> shift) + 2 ** (_DIGIT_BITS - 1)
            else:
                keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefix]
                digits = (keys >> shift) & (2**_DIGIT_BITS - 1)
            counts += np.bincount(digits.numpy(), minlength=2**_DIGIT_BITS)
        cumulative = counts.cumsum()
        digit = int(np.searchsorted(cumulative, rank - below, side="right"))
        below += int(cumulative[digit - 1]) if digit else 0
        prefix = digit - 2 ** (_DIGIT_BITS - 1) if shift == top else (prefix << _DIGIT_BITS) | digit
    key = torch.tensor([prefix], dtype=torch.int64 if width == 64 else torch.int32)
    return float(_flip(key).view(values.dtype)), below + int(counts[digit])


def _smallest_above(values: torch.Tensor, threshold: float) -> float:
    """The smallest entry of ``values`` larger than ``threshold``, one row block at a time."""
    smallest = math.inf
    for (block,) in row_blocks(values):
        above = block[block > threshold]
        if len(above):
            smallest = min(smallest, float(above.min()))
    return smallest


def percentile(values: torch.Tensor, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation over all entries) without a copy
    of ``values``: exact, from two to five passes over row blocks of a float32 or float64
    tensor of finite values.

    The interpolation is done in float64; numpy does it in the input's dtype, which can differ
    in the last bit of a float32 result.
    """
    position = q / 100 * (values.numel() - 1)
    low = int(position)
    low_value, at_most = _select(values, low)
    if position == low or at_most > low + 1:
        return low_value  # the next entry up ties with this one
    high_value = _smallest_above(values, low_value)
    return low_value + (position - low) * (high_value - low_value)
