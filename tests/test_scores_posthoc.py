"""The later post-hoc scorers: hand-computed cases, cross-checks against independent
computations of the published formulas, and refitting after a parameter change."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from test_scores import close, linear, outs
from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.scores import SCORERS, make_scorer

LN3 = math.log(3)


def random_outputs(n: int, d: int, c: int, seed: int) -> tuple[Outputs, nn.Linear]:
    """Non-negative features, a random head and the logits it gives; labels = argmax + noise."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, d, generator=gen))
        head.bias.copy_(torch.randn(c, generator=gen))
    feats = torch.rand(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    with torch.no_grad():
        logits = head(feats)
    labels = torch.where(torch.rand(n, generator=gen) < 0.8, logits.argmax(1), torch.arange(n) % c)
    return Outputs(feats, logits, labels), head


# ---------------------------------------------------------------- hand-computed cases


def test_entropy():
    scores = make_scorer("entropy").score(outs(logits=[[LN3, 0.0]]), linear([[1.0]]))
    assert close(scores, [0.75 * math.log(0.75) + 0.25 * math.log(0.25)])


def test_tempscale_fits_temperature_on_nll():
    # Logit gap 2 everywhere, 3 of 4 labels agree: the NLL optimum has sigmoid(2 / T) = 3 / 4.
    val = outs(logits=[[2.0, 0.0]] * 4, labels=[0, 0, 0, 1])
    scorer = make_scorer("tempscale").fit(val, linear([[1.0]]))
    assert scorer.temperature_ == pytest.approx(2 / LN3, rel=1e-4)
    scores = scorer.score(outs(logits=[[1.0, 0.0]]), linear([[1.0]]))
    assert close(scores, [1 / (1 + math.exp(-LN3 / 2))])


def test_klm_templates_and_one_hot_fallback():
    # Both validation samples are predicted as class 0: template (0.75, 0.25); class 1 gets the
    # one-hot template, at infinite KL from any p with p_0 > 0.
    val = outs(logits=[[LN3, 0.0], [LN3, 0.0]])
    scorer = make_scorer("klm").fit(val, linear([[1.0]]))
    assert close(scorer.templates_, [[0.75, 0.25], [0.0, 1.0]])
    scores = scorer.score(outs(logits=[[0.0, 0.0]]), linear([[1.0]]))
    assert close(scores, [-0.5 * math.log(4 / 3)])


def test_gradnorm_closed_form():
    o = outs([[1.0, -2.0]], [[LN3, 0.0]])  # p = (0.75, 0.25): spread 0.5, ||z||_1 = 3
    assert close(make_scorer("gradnorm").score(o, linear([[1.0, 0.0], [0.0, 1.0]])), [1.5])


def test_she_uses_correct_predictions_only():
    # The last sample (label 1, predicted 0) is left out of both patterns.
    feats = [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [100.0, 100.0]]
    logits = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    scorer = make_scorer("she").fit(outs(feats, logits, [0, 0, 1, 1]), linear([[1.0, 0.0]] * 2))
    assert close(scorer.patterns_, [[2.0, 0.0], [0.0, 2.0]])
    scores = scorer.score(outs([[1.0, 1.0], [1.0, 5.0]], [[0.0, 1.0], [1.0, 0.0]]), linear([[1.0]]))
    assert close(scores, [2.0, 2.0])


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # identical distances
def test_openmax_recalibration():
    train = outs([[0.0]] * 4, [[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]], [0, 0, 1, 1])
    scorer = make_scorer("openmax", alpha=1).fit(train, linear([[1.0]] * 2))
    assert close(scorer.means_, [[2.0, 0.0], [0.0, 2.0]])
    scorer.loc_ = torch.zeros(2).double()  # CDF 1 - e^-d:
    scorer.shape_, scorer.scale_ = torch.ones(2).double(), torch.ones(2).double()
    scores = scorer.score(outs(logits=[[2.0, 0.0], [1.0, 0.5]]), linear([[1.0]]))
    # First: at its class mean, nothing moves to the unknown logit 0. Second: the top class
    # keeps exp(-d), d = ||(1, 0.5) - (2, 0)||; the rest goes to the unknown logit.
    kept = math.exp(-math.sqrt(1.25))
    unknown = 1 - kept
    p_second = math.exp(unknown) / (math.exp(kept) + math.exp(0.5) + math.exp(unknown))
    assert close(scores, [-1 / (math.exp(2) + 2), -p_second])


def test_openmax_weibull_starts_at_the_tail():
    """A distance below the tail of a class's training distances gets CDF 0 (no recalibration);
    one far beyond it CDF 1."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([5.0, 0.0]) + 0.3 * torch.randn(200, 2, generator=gen)
    train = Outputs(torch.zeros(200, 1), logits, torch.zeros(200, dtype=torch.long))
    scorer = make_scorer("openmax", alpha=1).fit(train, linear([[1.0]] * 2))
    tail = (logits.double() - scorer.means_[0]).norm(dim=1).sort().values[-20:]
    assert tail[0] - 1e-3 * (tail[-1] - tail[0]) == pytest.approx(float(scorer.loc_[0]))
    near, far = scorer.means_[0] + 0.01, scorer.means_[0] + torch.tensor([50.0, 0.0])
    scores = scorer.score(
        Outputs(torch.zeros(2, 1), torch.stack([near, far]).float(), -torch.ones(2)), None
    )
    assert close(scores, [-1 / (math.exp(near[0]) + math.exp(near[1]) + 1), -1.0])


def test_rmds():
    unit = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    feats = unit + [[10 + a, b] for a, b in unit]  # class means (0, 0), (10, 0); shared cov 0.5 I
    head = linear([[1.0, 1.0]] * 2)
    scorer = make_scorer("rmds").fit(outs(feats, labels=[0] * 4 + [1] * 4), head)
    # Whole-data mean (5, 0), covariance diag(25.5, 0.5): MD_0(1, 1) = 16 / 25.5 + 2.
    assert close(scorer.score(outs([[1.0, 1.0]]), head), [-(4 - 16 / 25.5 - 2)])


def test_residual_is_vims_residual():
    head = linear([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [1.0, -2.0])  # origin (-1, 2, 0)
    feats = [[1.0, 2.0, 0.0], [-3.0, 2.0, 0.0], [-1.0, 3.0, 0.0], [-1.0, 1.0, 0.0]]
    scorer = make_scorer("residual").fit(outs(feats, [[0.0, 0.0]] * 4), head)
    # Principal axis 0 (variance 2 against 0.5); the residual of (1, 2, 3) is its (y, z) norm.
    assert close(scorer.score(outs([[0.0, 4.0, 3.0]], [[0.0, 0.0]]), head), [-math.sqrt(13)])


def test_nnguide():
    train = outs([[1.0, 0.0], [0.0, 2.0]], [[LN3, 0.0], [0.0, 0.0]])  # energies ln 4, ln 2
    test = outs([[1.0, 1.0]], [[0.0, 0.0]])
    head = linear([[1.0, 1.0]])
    k1 = make_scorer("nnguide", k=1, bank_fraction=1).fit(train, head).score(test, head)
    k2 = make_scorer("nnguide", k=2, bank_fraction=1).fit(train, head).score(test, head)
    ln2, ln4 = math.log(2), math.log(4)
    assert close(k1, [ln4 / math.sqrt(2) * ln2])
    assert close(k2, [(ln4 + ln2) / (2 * math.sqrt(2)) * ln2])


def test_relation():
    train = outs([[1.0, 0.0], [0.0, 1.0]], [[LN3, 0.0], [0.0, LN3]])
    test = outs([[2.0, 2.0]], [[LN3, 0.0]])  # cosines 1/sqrt2; p . p_j = 0.625 and 0.375
    head = linear([[1.0, 1.0]])
    scores = {
        (power, thr): make_scorer("relation", power=power, threshold=thr, bank_fraction=1)
        .fit(train, head)
        .score(test, head)
        for power, thr in ((1, 0.03), (2, 0.03), (1, 0.3))
    }
    assert close(scores[1, 0.03], [1 / math.sqrt(2)])
    assert close(scores[2, 0.03], [(0.625**2 + 0.375**2) / 2])
    assert close(scores[1, 0.3], [0.625 / math.sqrt(2)])


def test_fdbd_and_nci():
    head = linear([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    train = outs([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0)
    test = outs([[3.0, 1.0]], [[3.0, 1.0, 0.0]])  # predicted 0; z - mu = (2, 1)
    fdbd = make_scorer("fdbd").fit(train, head).score(test, head)
    assert close(fdbd, [(2 / math.sqrt(2) + 3 / 1) / 2 / math.sqrt(5)])
    nci = make_scorer("nci", alpha=0.5).fit(train, head).score(test, head)
    assert close(nci, [2 / math.sqrt(5) + 0.5 * 4])


def test_ash_p_and_scale():
    head = linear([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    o = outs([[1.0, 2.0, 3.0, 4.0]])  # top half 3, 4: s1 = 10, s2 = 7
    assert close(make_scorer("ash_p", percentile=50).score(o, head), [math.log(1 + math.exp(4))])
    s = math.exp(10 / 7)
    scale = make_scorer("scale", percentile=50).score(o, head)
    assert close(scale, [math.log(math.exp(s) + math.exp(4 * s))])


def test_vra_per_unit_thresholds():
    train = outs([[float(i), 10.0 * i] for i in range(5)])  # 60th / 90th: 2.4 / 3.6 and 24 / 36
    head = linear([[1.0, 0.0], [0.0, 1.0]])
    scorer = make_scorer("vra", gamma=0.5).fit(train, head)
    assert close(scorer.low_, [2.4, 24.0]) and close(scorer.high_, [3.6, 36.0])
    scores = scorer.score(outs([[3.0, 50.0], [1.0, 30.0]]), head)
    # (3, 50) -> (3.5, 36); (1, 30) -> (0, 30.5)
    assert close(scores, [math.log(math.exp(3.5) + math.exp(36)), math.log(1 + math.exp(30.5))])


# ---------------------------------------------------------------- independent references


def test_gradnorm_matches_backward_pass_through_head():
    """The authors' procedure: per sample, backpropagate the cross-entropy against a target of
    ones through the head, and sum the absolute weight gradient (C times our KL gradient)."""
    o, head = random_outputs(6, 5, 4, seed=0)
    reference = []
    for z in o.features:
        head.zero_grad()
        loss = -torch.log_softmax(head(z[None]), dim=1).sum()
        loss.backward()
        reference.append(float(head.weight.grad.abs().sum()) / 4)
    assert torch.allclose(make_scorer("gradnorm").score(o, head), torch.tensor(reference).double())


def ash_on_map(x: torch.Tensor, percentile: float, sharpen: bool) -> torch.Tensor:
    """ASH as the paper describes it, on an (N, C, H, W) map: zero all but the top
    (100 - p) % values of each sample; ASH-S then multiplies by exp(sum before / sum after)."""
    flat = x.flatten(1)
    n = flat.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    threshold = flat.sort(dim=1, descending=True).values[:, k - 1 : k]
    pruned = torch.where(flat >= threshold, flat, torch.zeros_like(flat))
    if sharpen:
        pruned = pruned * torch.exp(flat.sum(1, keepdim=True) / pruned.sum(1, keepdim=True))
    return pruned.view_as(x)


@pytest.mark.parametrize(("name", "sharpen"), [("ash_p", False), ("ash_s", True)])
@pytest.mark.parametrize("percentile", [65, 90])
def test_ash_matches_the_papers_algorithm_on_pooled_maps(name, sharpen, percentile):
    o, head = random_outputs(8, 20, 3, seed=1)
    shaped = ash_on_map(o.features.double()[:, :, None, None], percentile, sharpen).flatten(1)
    weight, bias = head.weight.double().detach(), head.bias.double().detach()
    expected = torch.logsumexp(shaped @ weight.T + bias, dim=1)
    assert torch.allclose(make_scorer(name, percentile=percentile).score(o, head), expected)


def test_rmds_matches_sklearn_covariances():
    o, head = random_outputs(300, 6, 3, seed=2)
    x, y = o.features.double().numpy(), o.labels.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    within = EmpiricalCovariance().fit(x - means[y])
    whole = EmpiricalCovariance().fit(x)
    query = x[:10] + 0.3
    per_class = np.stack([within.mahalanobis(query - m + within.location_) for m in means], 1)
    background = whole.mahalanobis(query)
    expected = -(per_class - background[:, None]).min(1)
    test = Outputs(torch.from_numpy(query).float(), o.logits[:10], o.labels[:10])
    scores = make_scorer("rmds").fit(o, head).score(test, head)
    assert np.allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_klm_matches_scipy_kl():
    o, head = random_outputs(50, 4, 3, seed=3)
    scorer = make_scorer("klm").fit(o, head)
    p = torch.softmax(o.logits.double(), 1).numpy()
    expected = [-min(scipy.stats.entropy(pi, t) for t in scorer.templates_.numpy()) for pi in p]
    assert np.allclose(scorer.score(o, head).numpy(), expected)


def test_tempscale_matches_grid_search():
    o, head = random_outputs(400, 4, 3, seed=4)
    logits = o.logits.double()
    grid = torch.exp(torch.linspace(-3, 3, 6001, dtype=torch.float64))
    log_p = torch.log_softmax(logits[None] / grid[:, None, None], dim=2)
    nll = -log_p[:, torch.arange(len(logits)), o.labels].mean(dim=1)
    scorer = make_scorer("tempscale").fit(o, head)
    assert scorer.temperature_ == pytest.approx(float(grid[nll.argmin()]), rel=2e-3)


def test_fdbd_matches_point_to_hyperplane_distances():
    o, head = random_outputs(20, 5, 4, seed=5)
    scorer = make_scorer("fdbd").fit(o, head)
    w, b = head.weight.double().detach(), head.bias.double().detach()
    expected = []
    for z in o.features.double():
        y = int((w @ z + b).argmax())
        dists = [
            abs(float((w[y] - w[c]) @ z + b[y] - b[c])) / float((w[y] - w[c]).norm())
            for c in range(4)
            if c != y
        ]
        expected.append(np.mean(dists) / float((z - scorer.mean_).norm()))
    assert np.allclose(scorer.score(o, head).numpy(), expected, rtol=1e-5)


def test_relation_and_nnguide_match_brute_force():
    train, head = random_outputs(90, 5, 3, seed=6)
    test, _ = random_outputs(7, 5, 3, seed=7)
    cos = nn.functional.cosine_similarity(
        test.features.double()[:, None], train.features.double()[None], dim=2
    )
    p, q = (torch.softmax(o.logits.double(), 1) for o in (test, train))
    rel = cos.clamp(min=0) * (p @ q.T)
    expected = (rel * (rel > 0.03)).pow(2).sum(1)
    scorer = make_scorer("relation", power=2, bank_fraction=1).fit(train, head)
    assert torch.allclose(scorer.score(test, head), expected, rtol=1e-4)
    energy_train = torch.logsumexp(train.logits.double(), 1)
    guide = (cos * energy_train).topk(10, dim=1).values.mean(1)
    expected = guide * torch.logsumexp(test.logits.double(), 1)
    scorer = make_scorer("nnguide", k=10, bank_fraction=1).fit(train, head)
    assert torch.allclose(scorer.score(test, head), expected, rtol=1e-4)


def test_bank_fraction_takes_evenly_spaced_rows():
    train, head = random_outputs(1000, 5, 3, seed=8)
    scorer = make_scorer("relation", bank_fraction=0.01).fit(train, head)
    expected = nn.functional.normalize(train.features[::100], dim=1)
    assert torch.allclose(scorer.features_, expected)
    assert len(make_scorer("nnguide", k=50).fit(train, head).bank_) == 50  # at least k rows


# ---------------------------------------------------------------- fitted state and errors

FITTED_WITH_PARAMS = {
    "knn": {"k": 2},
    "react": {"percentile": 50.0},
    "dice": {"sparsity": 50.0},
    "vim": {"dim": 1},
    "residual": {"dim": 1},
    "nnguide": {"k": 2},
    "relation": {"power": 2},
    "nci": {"alpha": 0.5},
    "openmax": {"tail": 3},
    "vra": {"low": 10.0},
    "forte": {"k": 3},
}


@pytest.mark.parametrize(("name", "change"), FITTED_WITH_PARAMS.items())
def test_changing_a_parameter_forgets_the_fit(name, change):
    train, head = random_outputs(120, 4, 3, seed=9)
    scorer = make_scorer(name).fit(train, head)
    copy = scorer.with_params(**change)
    assert all(getattr(copy, f.name) is None for f in dataclasses.fields(copy) if f.name[-1] == "_")
    assert copy.params() == {**scorer.params(), **change}
    scorer.score(train, head)  # the original keeps its fit
    for param, value in change.items():
        setattr(scorer, param, value)
    with pytest.raises(UserError, match=f"{name} must be fit"):
        scorer.score(train, head)
    refit = scorer.fit(train, head).score(train, head)
    assert torch.equal(refit, copy.fit(train, head).score(train, head))


def test_every_fitted_scorer_with_parameters_is_covered():
    with_params = {n for n, c in SCORERS.items() if c.requires_fit and make_scorer(n).params()}
    # Feature-map scorers need map summaries these outputs lack: test_scores_related.py.
    assert {n for n in with_params if not SCORERS[n].map_summaries} == set(FITTED_WITH_PARAMS)


def test_setting_a_bad_value_is_refused():
    scorer = make_scorer("scale")
    with pytest.raises(UserError, match="scale: percentile must be a number in"):
        scorer.percentile = 100
    with pytest.raises(UserError, match="vra: low"):
        make_scorer("vra", low=95.0, high=90.0)


@pytest.mark.parametrize("name", ["rmds", "she", "openmax", "tempscale"])
def test_label_scorers_need_labels(name):
    with pytest.raises(UserError, match=f"{name} needs the class labels"):
        make_scorer(name).fit(outs([[1.0], [2.0]], [[0.0, 1.0]] * 2), linear([[1.0]] * 2))


def test_nnguide_k_larger_than_train_set():
    with pytest.raises(UserError, match="k=5 is larger than the 3"):
        make_scorer("nnguide", k=5).fit(outs([[1.0], [2.0], [3.0]], [[0.0]] * 3), linear([[1.0]]))
