"""Named random streams: one seed, independent generators per purpose.

A stream is keyed by the run's seed and a name (``"label-noise"``, ``"subset"``), through
:class:`numpy.random.SeedSequence`, so adding a new use of randomness never shifts another's
draws and no two purposes share numbers by an accident of arithmetic on the seed.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def seed_sequence(seed: int, name: str, *keys: int) -> np.random.SeedSequence:
    """The seed sequence of stream ``name`` (plus integer ``keys``, e.g. an epoch) of ``seed``."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode()), *keys])


def numpy_rng(seed: int, name: str, *keys: int) -> np.random.Generator:
    """A NumPy generator for stream ``name`` of ``seed``."""
    return np.random.default_rng(seed_sequence(seed, name, *keys))


def stream_seed(seed: int, name: str, *keys: int) -> int:
    """A 63-bit integer seed for stream ``name`` of ``seed``, for ``torch.manual_seed``."""
    return int(seed_sequence(seed, name, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, name: str, *keys: int) -> torch.Generator:
    """A CPU torch generator for stream ``name`` of ``seed``."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *keys))


def seed_global(seed: int, name: str, *keys: int) -> None:
    """Seed PyTorch's global generator (weight initialisation, dropout: layers that draw from
    it) from stream ``name`` of ``seed``."""
    torch.manual_seed(stream_seed(seed, name, *keys))
