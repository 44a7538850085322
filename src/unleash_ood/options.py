"""Keyword options of a model constructor (``--model-arg KEY=VALUE``), checked against its
signature before the model is built, so a bad value is one line, not a traceback mid-training.

Every option of the built-in classifiers and detectors is a size or count (a positive
integer), a weight or rate (a finite number >= 0; an integer is accepted), a switch or a
name; each constructor checks its own ranges beyond that (a dropout below 1, say).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Collection
from typing import Any

from unleash_ood.errors import UserError

EXPECTED = {
    int: "a positive integer",
    float: "a finite number >= 0",
    bool: "true or false",
    str: "a string",
}


def option_defaults(build: Callable[..., Any], skip: Collection[str] = ()) -> dict[str, Any]:
    """The keyword arguments of ``build`` a user may set, with their defaults."""
    params = inspect.signature(build).parameters
    return {n: p.default for n, p in params.items() if n not in skip}


def check_options(
    what: str, build: Callable[..., Any], options: dict[str, Any], skip: Collection[str] = ()
) -> None:
    """Refuse an option ``build`` does not take (``skip``: those its caller passes itself) or
    a value not of its default's kind; ``what`` names the model in the message."""
    defaults = option_defaults(build, skip)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(f"{n}={v!r}" for n, v in defaults.items()) or "none"
        raise UserError(f"{what} does not accept {', '.join(unknown)}; its options are: {accepted}")
    for name, value in options.items():
        default = defaults[name]
        if default is inspect.Parameter.empty or default is None:
            continue  # no default to take the kind from
        expected = type(default)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if expected is int:
            ok = number and isinstance(value, int) and value >= 1
        elif expected is float:
            ok = number and math.isfinite(value) and value >= 0
        else:
            ok = isinstance(value, expected)
        if not ok:
            kind = EXPECTED.get(expected, f"a {expected.__name__}")
            raise UserError(
                f"{what} option {name} takes {kind} (default {default!r}), not {value!r}"
            )
