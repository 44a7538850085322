"""Post-hoc OOD scores by name: ``make_scorer("knn", k=10)`` or ``parse_scorer_list("msp,knn")``.

Every score is higher for more ID-like samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import suppress

from unleash_ood.errors import UserError
from unleash_ood.scores.activation import ASHP, SCALE, VRA
from unleash_ood.scores.base import Scorer
from unleash_ood.scores.boundary import FDBD, NCI
from unleash_ood.scores.distance import KNN, SSD, Mahalanobis
from unleash_ood.scores.gram import Gram
from unleash_ood.scores.layers import LayerMahalanobis
from unleash_ood.scores.multiscale import MODE
from unleash_ood.scores.neighbours import NNGuide, Relation
from unleash_ood.scores.odin import ODIN
from unleash_ood.scores.probability import KLM, Entropy, GradNorm, TempScale
from unleash_ood.scores.prototypes import SHE, OpenMax
from unleash_ood.scores.rankfeat import RankFeat
from unleash_ood.scores.residual import Residual
from unleash_ood.scores.rmds import RMDS
from unleash_ood.scores.shaping import ASHB, ASHS, DICE, ReAct
from unleash_ood.scores.softmax import GEN, MSP, Energy, MaxLogit
from unleash_ood.scores.typicality import Forte
from unleash_ood.scores.vim import ViM

# Display order: the first twelve as before, then the later ones by family: probabilities,
# the gradient norm, class prototypes, feature distances and geometry, activation shaping,
# then the related systems that read the feature map (MODE) or typicality (Forte), and
# the other feature-map scorers: RankFeat, multi-layer Mahalanobis and Gram; then SSD's single
# Gaussian (MOOD's score).
SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        MSP, MaxLogit, Energy, GEN, ODIN, Mahalanobis, KNN, ViM, ReAct, ASHS, ASHB, DICE,
        Entropy, TempScale, KLM, GradNorm, SHE, OpenMax, RMDS, Residual, NNGuide, Relation,
        FDBD, NCI, ASHP, SCALE, VRA, MODE, Forte, RankFeat, LayerMahalanobis, Gram, SSD,
    )
}  # fmt: skip

__all__ = [
    "ASHB",
    "ASHP",
    "ASHS",
    "DICE",
    "FDBD",
    "GEN",
    "KLM",
    "KNN",
    "MODE",
    "MSP",
    "NCI",
    "ODIN",
    "RMDS",
    "SCALE",
    "SCORERS",
    "SHE",
    "SSD",
    "VRA",
    "Energy",
    "Entropy",
    "Forte",
    "GradNorm",
    "Gram",
    "LayerMahalanobis",
    "Mahalanobis",
    "MaxLogit",
    "NNGuide",
    "OpenMax",
    "RankFeat",
    "ReAct",
    "Relation",
    "Residual",
    "Scorer",
    "TempScale",
    "ViM",
    "as_scorers",
    "make_scorer",
    "parse_scorer_list",
    "scorer_names",
    "scorer_params",
]


def scorer_names() -> list[str]:
    return list(SCORERS)


def _scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise UserError(f"unknown scorer {name!r}; choose from: {', '.join(SCORERS)}")
    return SCORERS[name]


def scorer_params(name: str) -> dict[str, object]:
    """The parameters a scorer takes, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(_scorer_class(name)) if f.init}


def make_scorer(name: str, **params: object) -> Scorer:
    valid = scorer_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        takes = f"its parameters are: {', '.join(valid)}" if valid else "it takes no parameters"
        raise UserError(f"{name} has no parameter {', '.join(unknown)}; {takes}")
    return SCORERS[name](**params)


def parse_scorer_list(spec: str) -> list[Scorer]:
    """Scorers from a command-line string.

    Comma-separated names (``"msp,energy,knn"``), or ``"all"`` alone for every scorer with its
    defaults. Parameters follow a name after colons: ``"energy:temperature=2,gen:gamma=0.5:m=10"``;
    a parameter whose default is a word takes a word (``"forte:density=kde"``).
    Each scorer may appear once, since results are reported under the scorer's name.
    """
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if entries == ["all"]:
        return [cls() for cls in SCORERS.values()]
    if not entries or "all" in entries:
        raise UserError(
            f"give scorer names separated by commas, or all alone; got {spec!r}. "
            f"Scorers: {', '.join(SCORERS)}"
        )
    return _listed_once([_parse_entry(entry) for entry in entries])


def as_scorers(scorers: str | Sequence[Scorer | str]) -> list[Scorer]:
    """Scorers from a command-line string (:func:`parse_scorer_list`) or from a sequence of
    scorer objects and entries of that string (``["msp", "knn:k=10", Energy()]``)."""
    if isinstance(scorers, str):
        return parse_scorer_list(scorers)
    parsed = [_parse_entry(s) if isinstance(s, str) else s for s in scorers]
    wrong = [s for s in parsed if not isinstance(s, Scorer)]
    if wrong:
        raise UserError(
            f"scorers are given as names ('msp,energy' or ['msp', 'energy']) or Scorer objects, "
            f"not {type(wrong[0]).__name__}"
        )
    return _listed_once(parsed)


def _listed_once(scorers: list[Scorer]) -> list[Scorer]:
    """``scorers``, refused when a name repeats: results are reported under the name."""
    names = [s.name for s in scorers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"scorer {', '.join(repeated)} is listed more than once; list it once")
    return scorers


def _parse_entry(entry: str) -> Scorer:
    name, *assignments = (part.strip() for part in entry.split(":"))
    defaults = scorer_params(name)
    params = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"bad scorer parameter {assignment!r} in {entry!r}: write e.g. knn:k=10"
            )
        word = isinstance(defaults.get(key.strip()), str)
        params[key.strip()] = value.strip() if word else _parse_value(value.strip(), entry)
    return make_scorer(name, **params)


def _parse_value(text: str, entry: str) -> int | float | None:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        with suppress(ValueError):
            return kind(text)
    raise UserError(f"scorer parameter values must be numbers (or none); got {text!r} in {entry!r}")
