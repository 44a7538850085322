"""OOD detectors that need no classifier: a generative model trained on ID images alone, and
scores computed from it (higher = more ID-like, as everywhere).

- ``vae`` (:mod:`.vae`): the VAE of Error Reduction, restoring lossy inputs, scored by
  ``error_reduction`` (:mod:`.error_reduction`); trained plain (``lossy=none``), scored by
  ``score_test`` (:mod:`.score_test`), ``score_test_ekfac`` (:mod:`.score_test_ekfac`) and its
  likelihood ``elbo``.
- ``ama`` (:mod:`.ama`): AMA's encoder, generator and mirrored-pair critic; score ``ama``.
- ``diffusion`` (:mod:`.diffusion`): a small unconditional diffusion model and its DDIM
  inversion; score ``diffpath`` (:mod:`.diffpath`).
- ``mim`` (:mod:`.mim`): MOOD's masked-image-modelling pretraining of a small ViT, then its
  fine-tuning as a classifier (:mod:`.mood`), scored by the classifier scorers (Mahalanobis).

Train with :func:`unleash_ood.generative.trainer.train_detector`, score with
:func:`unleash_ood.generative.evaluate.evaluate_detector`.
"""

from __future__ import annotations

from typing import Any

from unleash_ood.errors import UserError
from unleash_ood.generative.ama import AMA, AMAScore
from unleash_ood.generative.base import DetectorScore, GenerativeModel
from unleash_ood.generative.diffpath import DiffPath
from unleash_ood.generative.diffusion import Diffusion
from unleash_ood.generative.error_reduction import ErrorReduction
from unleash_ood.generative.mim import MaskedImageModel
from unleash_ood.generative.score_test import ScoreTest
from unleash_ood.generative.score_test_ekfac import ScoreTestEKFAC
from unleash_ood.generative.vae import ELBO, VAE
from unleash_ood.options import check_options

MODELS: dict[str, type[GenerativeModel]] = {
    cls.kind: cls for cls in (VAE, AMA, Diffusion, MaskedImageModel)
}
SCORES: dict[str, type[DetectorScore]] = {
    cls.name: cls for cls in (ErrorReduction, ScoreTest, ScoreTestEKFAC, ELBO, AMAScore, DiffPath)
}

__all__ = [
    "MODELS",
    "SCORES",
    "DetectorScore",
    "GenerativeModel",
    "create_detector",
    "parse_detector_scores",
]


def create_detector(
    kind: str, in_channels: int, input_size: int, **options: Any
) -> GenerativeModel:
    """An untrained detector model by kind, e.g. ``create_detector("vae", 1, 28, width=16)``.

    Options are checked by :func:`~unleash_ood.options.check_options` before the model is
    built; the models check their own ranges beyond that."""
    if kind not in MODELS:
        raise UserError(f"unknown detector kind {kind!r}; choose {', '.join(MODELS)}")
    check_options(f"detector {kind!r}", MODELS[kind], options, skip=("in_channels", "input_size"))
    try:
        return MODELS[kind](in_channels=in_channels, input_size=input_size, **options)
    except UserError:
        raise
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"detector {kind!r} cannot be built with options {options} ({e}); check the values"
        ) from e


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_detector_scores(spec: str, kind: str) -> list[DetectorScore]:
    """Scores of a detector from ``"error_reduction:lam=2,score_test"``; ``"all"`` alone gives
    every score the kind supports. Each name may appear once."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    supported = [n for n, cls in SCORES.items() if kind in cls.kinds]
    if entries == ["all"]:
        return [SCORES[n]() for n in supported]
    if not entries:
        raise UserError(f"no score given; choose from {', '.join(supported)} or all")
    out: list[DetectorScore] = []
    for entry in entries:
        name, *pairs = entry.split(":")
        if name not in supported:
            raise UserError(
                f"unknown score {name!r} for a {kind} detector; choose from {', '.join(supported)}"
            )
        if name in (s.name for s in out):
            raise UserError(f"score {name!r} is given twice; give each score once")
        params = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"score parameters are key=value; got {pair!r} in {entry!r}")
            params[key] = _value(value)
        try:
            out.append(SCORES[name](**params))
        except TypeError as e:
            valid = ", ".join(SCORES[name]().params()) or "none"
            raise UserError(
                f"{name} does not take {', '.join(sorted(params))}; its parameters: {valid}"
            ) from e
    return out
