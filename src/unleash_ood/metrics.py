"""OOD detection metrics as pure functions of two score arrays (higher score = more ID-like).

All values are fractions in [0, 1]; reports multiply by 100.

Threshold rule. A detector accepts a sample as ID when ``score >= t``. The ROC curve is traced
over every distinct score value as ``t``, so tied samples always fall on the same side of a
threshold, and the result does not depend on the order in which ties arrive. "FPR at 95 % TPR"
is the false-positive rate at the first (highest) threshold whose true-positive rate reaches
0.95, exactly ``fpr[argmax(tpr >= 0.95)]`` on scikit-learn's ``roc_curve``.

Two conventions for FPR95 exist in the literature and both are reported, named explicitly:

* ``fpr95_id``: ID is the positive class. The fraction of OOD samples still accepted when 95 % of
  ID samples are accepted. This is what the Unleashing Mask paper (and ODIN, Energy, OE) report.
* ``fpr95_ood``: OOD is the positive class (OpenOOD v1.5). The fraction of ID samples rejected
  when 95 % of OOD samples are caught.

AUROC is the same in both conventions. AUPR-In takes ID as positive, AUPR-Out takes OOD as
positive; both are average precision as scikit-learn defines it (no interpolation).
"""

from __future__ import annotations

import numpy as np
import torch

from unleash_ood.errors import UserError

METRIC_NAMES = ("auroc", "fpr95_id", "fpr95_ood", "aupr_in", "aupr_out", "detection_error")
# Metrics where lower is better; the others are higher-is-better.
LOWER_IS_BETTER = frozenset({"fpr95_id", "fpr95_ood", "detection_error"})


def _as_array(x, what: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
    a = a.reshape(-1)
    if a.size == 0:
        raise UserError(f"{what} scores are empty: every dataset needs at least one sample")
    if not np.isfinite(a).all():
        raise UserError(f"{what} scores contain NaN or inf; check the model's logits")
    return a


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TPR, FPR and precision at every distinct threshold, highest threshold first.

    A leading point (0, 0) is included for the TPR/FPR arrays; precision has one entry less.
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos)[last_of_run]
    fps = last_of_run + 1 - tps
    precision = tps / (tps + fps)
    tpr = np.r_[0.0, tps / pos.size]
    fpr = np.r_[0.0, fps / neg.size]
    return tpr, fpr, precision


def fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, level: float = 0.95) -> float:
    """FPR at the first threshold (from the top) whose TPR reaches ``level``."""
    tpr, fpr, _ = roc_points(pos, neg)
    return float(fpr[np.argmax(tpr >= level - 1e-12)])


def _auroc(tpr: np.ndarray, fpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def _average_precision(tpr: np.ndarray, precision: np.ndarray) -> float:
    return float(np.sum(np.diff(tpr) * precision))


def ood_metrics(id_scores, ood_scores, level: float = 0.95) -> dict[str, float]:
    """Every OOD metric for one ID/OOD pair, as fractions.

    Keys: ``auroc``, ``fpr95_id``, ``fpr95_ood``, ``aupr_in``, ``aupr_out`` and
    ``detection_error`` (the minimum over thresholds of the mean of the two error rates).
    """
    s_in = _as_array(id_scores, "ID")
    s_out = _as_array(ood_scores, "OOD")
    tpr, fpr, prec_in = roc_points(s_in, s_out)
    tpr_o, fpr_o, prec_out = roc_points(-s_out, -s_in)
    return {
        "auroc": _auroc(tpr, fpr),
        "fpr95_id": float(fpr[np.argmax(tpr >= level - 1e-12)]),
        "fpr95_ood": float(fpr_o[np.argmax(tpr_o >= level - 1e-12)]),
        "aupr_in": _average_precision(tpr, prec_in),
        "aupr_out": _average_precision(tpr_o, prec_out),
        "detection_error": float(np.min(0.5 * (1 - tpr) + 0.5 * fpr)),
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy over samples that have a class (label >= 0)."""
    known = labels >= 0
    if not bool(known.any()):
        raise UserError("accuracy needs labelled samples; the set has none")
    return float((logits[known].argmax(1) == labels[known]).double().mean())


class OODMetrics:
    """Streaming form of :func:`ood_metrics`: ``update`` per batch, ``compute`` at the end.

    Scores are kept (as float64, 8 bytes a sample): exact ranking metrics need them all.
    """

    def __init__(self, level: float = 0.95):
        self.level = level
        self._id: list[np.ndarray] = []
        self._ood: list[np.ndarray] = []

    def update(self, id_scores=None, ood_scores=None) -> OODMetrics:
        if id_scores is not None:
            self._id.append(_as_array(id_scores, "ID"))
        if ood_scores is not None:
            self._ood.append(_as_array(ood_scores, "OOD"))
        return self

    def compute(self) -> dict[str, float]:
        if not self._id or not self._ood:
            raise UserError("OODMetrics.compute needs both ID and OOD scores; call update first")
        return ood_metrics(np.concatenate(self._id), np.concatenate(self._ood), self.level)

    def reset(self) -> None:
        self._id.clear()
        self._ood.clear()
