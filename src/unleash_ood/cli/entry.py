"""The ``unleash`` command: the parser of every sub-command and the entry point that runs one,
turning a :class:`~unleash_ood.errors.UserError` into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import TextIO

from unleash_ood import __version__
from unleash_ood.cli import atypical, demo, detector, evaluation, training, watermark
from unleash_ood.cli.args import HelpFormatter, Parser
from unleash_ood.errors import UserError
from unleash_ood.heap import reuse_batch_buffers
from unleash_ood.progress import decoding_bars
from unleash_ood.rundir import out_lock

# The sub-command modules, in the order ``unleash --help`` lists their commands.
COMMANDS = (evaluation, training, atypical, demo, watermark, detector)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unleash",
        description="OOD detection for image classifiers (Unleashing Mask).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"unleash-ood {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = partial(sub.add_parser, formatter_class=HelpFormatter)
    for module in COMMANDS:
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_batch_buffers()
    try:
        with (
            _run_folder_lock(args),
            decoding_bars(not getattr(args, "no_progress", False)),
            warnings.catch_warnings(),  # restores showwarning afterwards
        ):
            warnings.showwarning = partial(_one_line_warning, f"unleash {args.command}")
            args.func(args)
    except UserError as e:
        print(f"unleash {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun it with --resume to continue from the last saved epoch"
        hint = hint if _resumable(args) else ""
        print(f"unleash {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _one_line_warning(
    prog: str,
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as the command's own line on stderr, like its errors (no source location)."""
    print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)


def _run_folder_lock(args: argparse.Namespace) -> AbstractContextManager:
    """The lock on ``--out`` for commands that write one; under torchrun rank 0 holds it."""
    out = getattr(args, "out", None)
    if out is None or os.environ.get("RANK", "0") != "0":
        return nullcontext()
    return out_lock(Path(out), getattr(args, "out_name", "--out"))


def _resumable(args: argparse.Namespace) -> bool:
    """Whether the interrupted command saves epochs that ``--resume`` continues from."""
    return hasattr(args, "resume") and getattr(args, "out", None) is not None


def _leave_process_group() -> None:
    """Under torchrun, shut the process group down before exit: gloo's threads still running
    at interpreter shutdown abort the process (``terminate called without an active
    exception``), failing a run that had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
