"""check_options: a constructor's keyword options against its signature, by hand."""

from __future__ import annotations

import pytest

from unleash_ood.errors import UserError
from unleash_ood.options import check_options, option_defaults


def build(
    channels: int,
    width: int = 8,
    rate: float = 0.5,
    flag: bool = False,
    name: str = "a",
    extra: object = None,
):
    """A stand-in constructor: ``channels`` is passed by the caller, the rest are options."""


def test_defaults_leave_out_what_the_caller_passes() -> None:
    assert option_defaults(build, skip=("channels",)) == {
        "width": 8,
        "rate": 0.5,
        "flag": False,
        "name": "a",
        "extra": None,
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"width": 1, "rate": 0, "flag": True, "name": "b"},
        {"rate": 2},  # an integer where a float is expected
        {"extra": [1, 2]},  # no default kind to hold it to
    ],
)
def test_good_options_pass(options: dict) -> None:
    check_options("model 'm'", build, options, skip=("channels",))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depth": 2}, "model 'm' does not accept depth; its options are: width=8, rate=0.5"),
        ({"channels": 3}, "does not accept channels"),
        ({"width": 0}, "model 'm' option width takes a positive integer (default 8), not 0"),
        ({"width": 2.0}, "option width takes a positive integer (default 8), not 2.0"),
        ({"width": True}, "option width takes a positive integer (default 8), not True"),
        ({"rate": -0.1}, "option rate takes a finite number >= 0 (default 0.5), not -0.1"),
        ({"rate": float("inf")}, "option rate takes a finite number >= 0 (default 0.5), not inf"),
        ({"rate": "x"}, "option rate takes a finite number >= 0 (default 0.5), not 'x'"),
        ({"flag": 1}, "option flag takes true or false (default False), not 1"),
        ({"name": 3}, "option name takes a string (default 'a'), not 3"),
    ],
)
def test_bad_options_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        check_options("model 'm'", build, options, skip=("channels",))
    assert message in str(e.value)
