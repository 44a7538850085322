import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from unleash_ood.errors import UserError
from unleash_ood.metrics import OODMetrics, accuracy, fpr_at_tpr, ood_metrics


def sklearn_reference(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr_o, tpr_o, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "fpr95_id": fpr[np.argmax(tpr >= 0.95)],
        "fpr95_ood": fpr_o[np.argmax(tpr_o >= 0.95)],
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [False, True])
def test_matches_sklearn(seed: int, tied: bool) -> None:
    rng = np.random.default_rng(seed)
    s_in = rng.normal(1.0, 1.0, 300 + seed * 37)
    s_out = rng.normal(0.0, 1.5, 500 - seed * 23)
    if tied:  # coarse scores: many ties within and across the two sets
        s_in, s_out = np.round(s_in), np.round(s_out)
    ours = ood_metrics(s_in, s_out)
    for key, want in sklearn_reference(s_in, s_out).items():
        assert ours[key] == pytest.approx(want, abs=1e-12), key


def test_hand_computed_case() -> None:
    # ID 4 samples, OOD 4 samples. Accept when score >= t.
    s_in = np.array([4.0, 3.0, 2.0, 1.0])
    s_out = np.array([2.5, 0.5, 0.0, -1.0])
    m = ood_metrics(s_in, s_out)
    # pairs (id > ood): 4>all(4), 3>all(4), 2>3 of 4, 1>3 of 4 -> 14/16
    assert m["auroc"] == pytest.approx(14 / 16)
    # 95 % ID recall needs all 4 ID accepted -> t = 1 -> OOD accepted: 2.5 -> 1/4
    assert m["fpr95_id"] == pytest.approx(0.25)
    # 95 % OOD recall needs all 4 OOD rejected (score <= 2.5) -> ID rejected: 2, 1 -> 2/4
    assert m["fpr95_ood"] == pytest.approx(0.5)
    # detection error: t = 1 accepts all ID and one OOD: (1 - 4/4)/2 + (1/4)/2
    assert m["detection_error"] == pytest.approx(0.125)


def test_ties_are_order_independent() -> None:
    s_in = np.array([1.0, 1.0, 1.0, 0.0])
    s_out = np.array([1.0, 0.0, 0.0, 0.0])
    a = ood_metrics(s_in, s_out)
    b = ood_metrics(s_in[::-1], s_out[::-1])
    assert a == b
    assert a["auroc"] == pytest.approx((3 * 3 + 3 * 0.5 + 0.5 * 3) / 16)


def test_perfect_and_inverted_separation() -> None:
    perfect = ood_metrics([2.0, 3.0], [0.0, 1.0])
    assert perfect["auroc"] == 1.0 and perfect["fpr95_id"] == 0.0 and perfect["fpr95_ood"] == 0.0
    inverted = ood_metrics([0.0, 1.0], [2.0, 3.0])
    assert inverted["auroc"] == 0.0 and inverted["fpr95_id"] == 1.0


def test_fpr_at_tpr_level() -> None:
    s_in = np.arange(100.0)
    s_out = np.arange(100.0) - 50
    # 95 % of ID accepted at t = 5: OOD with score >= 5 are 45 of 100
    assert fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(0.45)


def test_streaming_equals_functional() -> None:
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(1, 1, 200), rng.normal(0, 1, 300)
    stream = OODMetrics()
    for a, b in zip(np.split(s_in, 4), np.split(s_out, 4), strict=True):
        stream.update(id_scores=torch.from_numpy(a), ood_scores=b)
    assert stream.compute() == ood_metrics(s_in, s_out)


@pytest.mark.parametrize("bad", [[], [np.nan, 1.0], [np.inf]])
def test_bad_scores_rejected(bad) -> None:
    with pytest.raises(UserError):
        ood_metrics(bad, [0.0, 1.0])


def test_accuracy_ignores_unlabelled() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 0, -1])) == pytest.approx(0.5)
