"""Run directories: checked before any work starts, never overwritten.

Every command writes its results into one folder (``--out``). The folder is checked up front,
so a mistake costs nothing: a file where a folder should be, a folder that already holds
results, a folder of someone else's files (``--out .`` in a project, ``--out ~``), or one that
cannot be written is refused with a one-line message before the first forward pass.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unleash_ood.errors import UserError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# Files whose presence means a folder already holds the results of some command.
RESULT_FILES = ("config.json", "metrics.json", "atypical.csv", "demo.json")


def check_out(out: Path) -> None:
    """Refuse ``out`` unless it is absent or a result-free folder we can write."""
    check_writable(out)
    held = [f for f in RESULT_FILES if (out / f).exists()]
    if held:
        raise UserError(
            f"--out {out} already holds results ({held[0]}); choose another folder, or "
            f"remove it to redo the run"
        )


def check_writable(out: Path, name: str = "--out") -> None:
    """Refuse an ``out`` that is a file, or that cannot be made or written; ``name``: what the
    command line calls it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{name} {out} is a file; give a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not can_make_folder_in(parent):
        raise UserError(f"cannot write into {parent}; choose a {name} folder you can write to")


def can_make_folder_in(folder: Path) -> bool:
    """Whether a folder can be made in ``folder``, found by making (and removing) one:
    ``os.access`` says yes to root on read-only and virtual filesystems such as ``/proc``."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".unleash-probe-", dir=folder))
    except OSError:
        return False
    return True


LOCK_FILE = ".lock"
# The checkpoint ``finetune --model`` makes of your own model in its run folder.
OWN_START = "start"
# What a command may leave in its folder before it writes config.json, so that an interrupted
# first start can be rerun: the lock, the log, ``finetune --xi validate``'s runs and
# ``finetune --model``'s start checkpoint.
EARLY_ENTRIES = frozenset(
    {LOCK_FILE, "log.txt", "xi_search", f"{OWN_START}.safetensors", f"{OWN_START}.json"}
)


def is_run_folder(out: Path) -> bool:
    """Whether ``out/config.json`` is a command's record: a JSON object naming its command."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "command" in config


def check_own_folder(out: Path, name: str = "--out") -> None:
    """Refuse an existing folder that holds files no command of this library wrote (no
    config.json of a run, and more than an interrupted first start leaves): results must not
    be written among, or over, files of the user's or another program's."""
    if not out.is_dir() or is_run_folder(out):
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EARLY_ENTRIES)
    if foreign:
        raise UserError(
            f"{name} {out} holds files this library did not write ({foreign[0]}); choose a new "
            f"or empty folder"
        )


@contextmanager
def out_lock(out: Path, name: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on the run folder ``out`` while a command writes into it.

    A second command aimed at the same folder is refused at once instead of both writing
    results and logs over each other. The lock is an ``flock`` on ``out/.lock``: the system
    releases it when the process dies, so a killed run never leaves a stale lock. A folder
    this command created is removed again if the command leaves nothing in it (e.g. it
    stopped at a bad flag). A folder of files this library did not write is refused
    (:func:`check_own_folder`).
    """
    check_writable(out, name)
    check_own_folder(out, name)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    with open(lock, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(
                    f"another unleash command is writing into --out {out}; wait for it to "
                    f"finish or choose another folder"
                ) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            if created and not holds_files(out):
                out.rmdir()


def holds_files(out: Path) -> bool:
    """Whether the folder ``out`` exists and holds anything besides a command's lock."""
    return out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())


def append_log(out: Path, text: str, echo: bool = False) -> None:
    """Append ``text`` (a line or lines) to ``out/log.txt``; ``echo`` also prints it above
    any progress bar."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as f:
        f.write(text.rstrip("\n") + "\n")
    if echo:  # above any progress bar, which tqdm.write keeps intact
        from tqdm.auto import tqdm  # only where training prints: keeps this module light

        tqdm.write(text)
