"""The ``unleash`` command: thin sub-commands over the library's API, one module per area
(:mod:`.evaluation`, :mod:`.training`, :mod:`.atypical`, :mod:`.demo`, :mod:`.watermark`,
:mod:`.detector`), their shared flags in :mod:`.args`, the parser and entry point in
:mod:`.entry`."""

from unleash_ood.cli.entry import build_parser, main

__all__ = ["build_parser", "main"]
