"""Progress bars that sit below any caller's ``progress`` flag.

Image folders are decoded where a dataset is first read, deep inside a benchmark's lazy
loaders, where no ``progress`` argument reaches. A command's ``--no-progress`` hides their bars
through :func:`decoding_bars`; everything else takes ``progress`` as an argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DECODING_BARS: ContextVar[bool] = ContextVar("decoding_bars", default=True)


@contextmanager
def decoding_bars(show: bool) -> Iterator[None]:
    """Show (or hide) the progress bars of image-folder decoding within the block."""
    token = _DECODING_BARS.set(show)
    try:
        yield
    finally:
        _DECODING_BARS.reset(token)


def show_decoding_bars() -> bool:
    """Whether image-folder decoding shows a progress bar here."""
    return _DECODING_BARS.get()
