"""Post-hoc scorers: hand-computed cases, registry, sign convention, ODIN's gradient step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models.base import Classifier
from unleash_ood.outputs import Outputs
from unleash_ood.scores import (
    SCORERS,
    Energy,
    as_scorers,
    make_scorer,
    parse_scorer_list,
    scorer_names,
    scorer_params,
)
from unleash_ood.scores.distance import knn_distance, top_candidates

ALL_NAMES = [
    "msp", "maxlogit", "energy", "gen", "odin", "mahalanobis", "knn", "vim", "react", "ash_s",
    "ash_b", "dice", "entropy", "tempscale", "klm", "gradnorm", "she", "openmax", "rmds",
    "residual", "nnguide", "relation", "fdbd", "nci", "ash_p", "scale", "vra", "mode", "forte",
    "rankfeat", "mahalanobis_layers", "gram", "ssd",
]  # fmt: skip


def linear(weight, bias=None) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else torch.tensor(bias))
    return head


def outs(features=None, logits=None, labels=None) -> Outputs:
    """Outputs with whatever the scorer under test ignores filled with zeros / -1."""
    features = torch.zeros(len(logits), 1) if features is None else torch.tensor(features)
    logits = torch.zeros(len(features), 1) if logits is None else torch.tensor(logits)
    labels = torch.full((len(features),), -1) if labels is None else torch.tensor(labels)
    return Outputs(features.float(), logits.float(), labels)


def close(actual: torch.Tensor, expected) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


class LinearNet(Classifier):
    """Features are the normalised pixels themselves, so the whole model is one linear map."""

    def __init__(self, head: nn.Linear, mean: float = 0.0, std: float = 1.0):
        super().__init__((mean,), (std,))
        self.trunk = nn.Flatten()
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


# ---------------------------------------------------------------- hand-computed small cases


def test_msp():
    scores = make_scorer("msp").score(outs(logits=[[2.0, 0.0], [0.0, 0.0]]), linear([[1.0]]))
    assert close(scores, [1 / (1 + math.exp(-2)), 0.5])


def test_maxlogit():
    scores = make_scorer("maxlogit").score(outs(logits=[[1.0, 3.0, -2.0]]), linear([[1.0]]))
    assert close(scores, [3.0])


def test_energy_with_temperature():
    o = outs(logits=[[math.log(3), 0.0], [0.0, 0.0]])
    assert close(make_scorer("energy").score(o, linear([[1.0]])), [math.log(4), math.log(2)])
    t2 = make_scorer("energy", temperature=2).score(o, linear([[1.0]]))
    assert close(t2, [2 * math.log(math.sqrt(3) + 1), 2 * math.log(2)])


def test_gen():
    o = outs(logits=[[math.log(3), 0.0]])  # probabilities 0.75, 0.25
    term = math.sqrt(0.75 * 0.25)
    assert close(make_scorer("gen", gamma=0.5).score(o, linear([[1.0]])), [-2 * term])
    assert close(make_scorer("gen", gamma=0.5, m=1).score(o, linear([[1.0]])), [-term])


def test_odin_hand_computed_step_is_in_pixel_units():
    # Normalisation (x - 0.5) / 0.5 doubles a pixel step: features move by 2 * epsilon.
    model = LinearNet(linear([[1.0, 0.0], [0.0, 1.0]]), mean=0.5, std=0.5).eval()
    x = torch.tensor([[0.6, 0.4], [0.2, 0.5]]).view(2, 1, 1, 2)
    scores = make_scorer("odin", temperature=1, epsilon=0.1).score_batch(model, x)
    # Sample 1: features (0.2, -0.2) -> after the step (0.4, -0.4); sample 2: class 1,
    # features (-0.6, 0) -> (-0.8, 0.2).
    assert close(scores, [1 / (1 + math.exp(-0.8)), 1 / (1 + math.exp(-1.0))])


def test_mahalanobis():
    unit = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    feats = unit + [[10 + a, b] for a, b in unit]  # class means (0, 0) and (10, 0)
    train = outs(feats, labels=[0] * 4 + [1] * 4)
    scorer = make_scorer("mahalanobis").fit(train, linear([[1.0, 1.0]]))
    # Shared covariance diag(0.5, 0.5) -> precision diag(2, 2).
    scores = scorer.score(outs([[1.0, 1.0], [7.0, 0.0]]), linear([[1.0, 1.0]]))
    assert close(scores, [-4.0, -18.0])


def test_ssd_is_one_gaussian_of_the_normalised_features():
    # normalised: (1, 0), (0, 1), (-1, 0), (0, -1); mean 0, biased covariance diag(0.5, 0.5)
    train = outs([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0], [0.0, -1.0]], labels=[0, 0, 0, 1])
    head = linear([[1.0, 1.0]])
    scores = make_scorer("ssd").fit(train, head).score(outs([[3.0, 4.0], [0.3, 0.0]]), head)
    assert close(scores, [-2.0, -2.0])  # every unit vector: 2 * |x|^2


def test_ssd_matches_moods_one_cluster_score():
    # dvlab-research/MOOD ood_utils.py get_scores_one_cluster on L2-normalised features
    rng = np.random.default_rng(0)
    ftrain, ftest = rng.normal(size=(200, 6)) + 1, rng.normal(size=(30, 6))
    ftrain = ftrain / (np.linalg.norm(ftrain, axis=-1, keepdims=True) + 1e-10)
    unit_test = ftest / (np.linalg.norm(ftest, axis=-1, keepdims=True) + 1e-10)
    centred = unit_test - ftrain.mean(0, keepdims=True)
    theirs = np.sum(centred * np.linalg.pinv(np.cov(ftrain.T, bias=True)).dot(centred.T).T, -1)
    head = linear([[1.0] * 6])
    scorer = make_scorer("ssd").fit(outs(rng.permutation(ftrain) * 3), head)
    np.testing.assert_allclose(scorer.score(outs(ftest), head).numpy(), -theirs, rtol=1e-5)


def test_knn_normalises_and_takes_kth_neighbour():
    train = outs([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0]])
    test = outs([[1.0, 1.0]])  # cosine 1/sqrt2 to the first two, -1/sqrt2 to the third
    head = linear([[1.0, 1.0]])
    k1 = make_scorer("knn", k=1).fit(train, head).score(test, head)
    k3 = make_scorer("knn", k=3).fit(train, head).score(test, head)
    assert close(k1, [-math.sqrt(2 - math.sqrt(2))])
    assert close(k3, [-math.sqrt(2 + math.sqrt(2))])


def test_react():
    head = linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.5])
    train = outs([[0.0, 1.0], [2.0, 3.0]])  # median of 0, 1, 2, 3 is 1.5
    scores = make_scorer("react", percentile=50).fit(train, head).score(outs([[1.0, 4.0]]), head)
    assert close(scores, [math.log(math.exp(1.0) + math.exp(2.0))])


def test_ash():
    head = linear([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    o = outs([[1.0, 2.0, 3.0, 4.0]])  # keep the top 2 of 4; s1 = 10, s2 = 7
    scale = math.exp(10 / 7)
    ash_s = make_scorer("ash_s", percentile=50).score(o, head)
    assert close(ash_s, [math.log(math.exp(3 * scale) + math.exp(4 * scale))])
    assert close(make_scorer("ash_b", percentile=50).score(o, head), [5 + math.log(2)])


def test_ash_keeps_at_least_one_activation():
    head = linear([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    o = outs([[3.0, 1.0, 0.0, 0.0]])  # percentile 90 of 4 rounds to 0 kept -> keep 1
    assert close(make_scorer("ash_b").score(o, head), [math.log(math.exp(4.0) + 1)])


def test_dice():
    head = linear([[1.0, 2.0], [3.0, -1.0]], [0.5, -0.5])
    train = outs([[0.0, 2.0], [2.0, 0.0]])  # mean (1, 1): contributions = W
    # Median of (-1, 1, 2, 3) is 1.5: keep W[0, 1] = 2 and W[1, 0] = 3.
    scores = make_scorer("dice", sparsity=50).fit(train, head).score(outs([[1.0, 1.0]]), head)
    assert close(scores, [2.5 + math.log(2)])


def test_vim():
    head = linear([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [1.0, -2.0])  # origin u = (-1, 2, 0)
    shifted = [[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]
    feats = [[a - 1, b + 2, c] for a, b, c in shifted]
    logits = [[f[0] + 1, f[1] - 2] for f in feats]  # max logits 2, 0, 1, 0: mean 0.75
    # Uncentred covariance diag(2, 0.5, 0); default dim = 3 // 2 = 1 keeps only axis 0, so the
    # train residuals are 0, 0, 1, 1 (mean 0.5) and alpha = 0.75 / 0.5.
    scorer = make_scorer("vim").fit(outs(feats, logits), head)
    test = outs([[0.0, 4.0, 3.0]], [[1.0, 2.0]])  # x - u = (1, 2, 3): residual sqrt(13)
    expected = math.log(math.e + math.e**2) - 1.5 * math.sqrt(13)
    assert close(scorer.score(test, head), [expected])


# ---------------------------------------------------------------- errors


def test_vim_dim_must_be_below_feature_dim():
    with pytest.raises(UserError, match="smaller than the feature dimension 3"):
        make_scorer("vim", dim=3).fit(outs([[1.0, 2.0, 3.0]], [[0.0]]), linear([[1.0, 0, 0]]))


def test_knn_k_larger_than_train_set():
    with pytest.raises(UserError, match="k=5 is larger than the 3"):
        make_scorer("knn", k=5).fit(outs([[1.0], [2.0], [3.0]]), linear([[1.0]]))


def test_mahalanobis_needs_labels():
    with pytest.raises(UserError, match="labels"):
        make_scorer("mahalanobis").fit(outs([[1.0], [2.0]]), linear([[1.0]]))


@pytest.mark.parametrize("name", [n for n, cls in SCORERS.items() if cls.requires_fit])
def test_unfitted_scorer_refuses_to_score(name):
    with pytest.raises(UserError, match=f"{name} must be fit"):
        make_scorer(name).score(outs([[1.0, 2.0]], [[0.0, 1.0]]), linear([[1.0, 0.0]] * 2))


def test_wrong_entry_point_is_a_type_error():
    with pytest.raises(TypeError):
        make_scorer("msp").fit(outs([[1.0]]), linear([[1.0]]))
    with pytest.raises(TypeError):
        make_scorer("odin").score(outs([[1.0]]), linear([[1.0]]))
    with pytest.raises(TypeError):
        make_scorer("energy").score_batch(LinearNet(linear([[1.0]])), torch.zeros(1, 1, 1, 1))


def test_registry_names_and_flags():
    assert scorer_names() == ALL_NAMES
    assert {n for n, c in SCORERS.items() if c.requires_fit} == {
        "mahalanobis", "knn", "vim", "react", "dice", "tempscale", "klm", "she", "openmax",
        "rmds", "residual", "nnguide", "relation", "fdbd", "nci", "vra", "mode",
        "forte", "mahalanobis_layers", "gram", "ssd"}  # fmt: skip
    assert [n for n, c in SCORERS.items() if c.needs_model] == ["odin"]
    assert scorer_params("gen") == {"gamma": 0.1, "m": 100}
    assert scorer_params("msp") == {}


def test_unknown_scorer_lists_valid_names():
    with pytest.raises(UserError, match="unknown scorer 'nope'") as info:
        make_scorer("nope")
    assert all(name in str(info.value) for name in ALL_NAMES)


def test_unknown_param_names_valid_params():
    with pytest.raises(UserError, match="knn has no parameter kk; its parameters are: k"):
        make_scorer("knn", kk=3)
    with pytest.raises(UserError, match="takes no parameters"):
        make_scorer("msp", temperature=2)


@pytest.mark.parametrize(
    ("name", "params"),
    [("knn", {"k": 0}), ("knn", {"k": 2.5}), ("energy", {"temperature": 0}),
     ("react", {"percentile": 100}), ("gen", {"m": True}), ("vim", {"dim": 0}),
     ("odin", {"epsilon": -1.0}), ("dice", {"sparsity": "90"})],
)  # fmt: skip
def test_bad_param_values(name, params):
    with pytest.raises(UserError, match=f"{name}: {next(iter(params))} must be"):
        make_scorer(name, **params)


def test_parse_scorer_list():
    assert [s.name for s in parse_scorer_list("all")] == ALL_NAMES
    scorers = parse_scorer_list(
        " msp, energy:temperature=2,knn:k=10 , gen:gamma=0.5:m=3,vim:dim=none"
    )
    assert [s.name for s in scorers] == ["msp", "energy", "knn", "gen", "vim"]
    assert (scorers[1].temperature, scorers[2].k, scorers[3].gamma, scorers[3].m) == (2, 10, 0.5, 3)
    assert scorers[4].dim is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [("", "give scorer names"), ("msp,all", "all alone"), ("msp,energy,msp", "more than once"),
     ("knn:k", "bad scorer parameter"), ("knn:k=ten", "must be numbers"),
     ("msp,foo", "unknown scorer 'foo'")],
)  # fmt: skip
def test_parse_scorer_list_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_scorer_list(spec)


def test_as_scorers_takes_a_string_or_a_list_of_names_and_objects():
    assert [s.name for s in as_scorers("msp,knn:k=3")] == ["msp", "knn"]
    energy = Energy(temperature=2.0)
    scorers = as_scorers(["msp", "knn:k=3", energy])
    assert [s.name for s in scorers] == ["msp", "knn", "energy"]
    assert scorers[1].k == 3 and scorers[2] is energy
    assert as_scorers(()) == []  # no scorer: an evaluation of accuracy alone
    with pytest.raises(UserError, match="msp is listed more than once"):
        as_scorers(["msp", make_scorer("msp")])
    with pytest.raises(UserError, match="Scorer objects, not int"):
        as_scorers(["msp", 3])
    with pytest.raises(UserError, match="unknown scorer 'nope'"):
        as_scorers(["nope"])


# ---------------------------------------------------------------- behaviour


def _synthetic_setup():
    """Two classes on disjoint blocks of a 16-dim non-negative feature (a 1x4x4 image): ID
    samples light up their class's block, the OOD sample is a single weak activation."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.zeros(2, 16)
    blocks[0, :8] = blocks[1, 8:] = 0.75
    labels = torch.arange(2).repeat_interleave(100)
    train_x = blocks[labels] + 0.05 * torch.rand(200, 16, generator=gen)
    id_x = blocks[[0, 0, 1]] + 0.05 * torch.rand(3, 16, generator=gen)
    ood_x = torch.zeros(2, 16)
    ood_x[0, 0] = ood_x[1, 8] = 0.25
    model = LinearNet(linear(blocks / 0.75)).eval()

    def outputs(x, y):
        with torch.no_grad():
            return Outputs(x, model(x.view(-1, 1, 4, 4)), y)

    return model, outputs(train_x, labels), id_x, ood_x, outputs


# 100 training samples per class: OpenMax's default tail of 20 would reject the top fifth of
# ID distances, one of the three ID samples among them.
SYNTHETIC_PARAMS = {"openmax": {"tail": 5}}


# Feature-map scorers read a map this linear model lacks: tests/test_scores_related.py.
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if not SCORERS[n].map_summaries])
def test_id_scores_higher_than_ood(name):
    model, train, id_x, ood_x, outputs = _synthetic_setup()
    scorer = make_scorer(name, **SYNTHETIC_PARAMS.get(name, {}))
    if scorer.requires_fit:
        scorer.fit(train, model.head)
    if scorer.needs_model:
        id_s, ood_s = (scorer.score_batch(model, x.view(-1, 1, 4, 4)) for x in (id_x, ood_x))
    else:
        id_s = scorer.score(outputs(id_x, torch.tensor([0, 0, 1])), model.head)
        ood_s = scorer.score(outputs(ood_x, torch.full((2,), -1)), model.head)
    assert id_s.shape == (3,) and ood_s.shape == (2,)
    assert id_s.min() > ood_s.max()


def test_knn_chunks_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    queries = nn.functional.normalize(torch.randn(37, 8, generator=gen), dim=1)
    bank = nn.functional.normalize(torch.randn(23, 8, generator=gen), dim=1)
    brute = torch.cdist(queries.double(), bank.double()).sort(dim=1).values[:, 4]
    tiled = knn_distance(queries, bank, k=5, query_rows=4, bank_rows=3)
    assert torch.allclose(tiled, brute, atol=1e-5)
    assert torch.allclose(knn_distance(queries, bank, k=5), brute, atol=1e-5)


def test_top_candidates_keep_the_k_largest_with_ties():
    gen = torch.Generator().manual_seed(3)
    # Few distinct values: many ties, and groups whose maxima tie with each other; five
    # columns after the last whole group.
    sims = torch.randint(0, 6, (40, 32 * 8 + 5), generator=gen).float()
    sims[0] = 1.0  # one row entirely tied
    sims[1, :7] = 9.0  # the k largest all in one group
    sims[2, -1] = 9.0  # the largest after the last group
    top7 = sims.topk(7, dim=1).values
    found = top_candidates(sims, 7, torch.full((40,), float("-inf")), group=8)
    assert found.shape == (40, 7 * 8 + 5)
    assert torch.equal(found.topk(7, dim=1).values, top7)
    # Above a floor, fewer groups; every entry above it among the 7 largest is still there.
    floor = torch.full((40,), 8.0)
    found = top_candidates(sims, 7, floor, group=8)
    assert found.shape[1] < 7 * 8 + 5
    for row, kept in zip(top7, found, strict=True):
        above = row[row > 8.0]
        assert torch.equal(kept.topk(len(above)).values, above.sort(descending=True).values)


def test_knn_grouped_search_matches_brute_force():
    """Bank tiles large enough for the grouped search, not whole numbers of groups, a last
    tile too small for it, and duplicated rows so that neighbours tie."""
    gen = torch.Generator().manual_seed(4)
    bank = nn.functional.normalize(torch.randn(700, 8, generator=gen), dim=1)
    bank = torch.cat([bank, bank[:50]])
    queries = nn.functional.normalize(torch.randn(29, 8, generator=gen), dim=1)
    brute = torch.cdist(queries.double(), bank.double()).sort(dim=1).values[:, 4]
    for query_rows, bank_rows in ((512, 8192), (6, 400), (29, 100)):
        found = knn_distance(queries, bank, 5, query_rows=query_rows, bank_rows=bank_rows)
        assert torch.allclose(found, brute, atol=1e-5)


def _random_model() -> tuple[LinearNet, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    head = nn.Linear(6, 3)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, 6, generator=gen))
        head.bias.copy_(torch.randn(3, generator=gen))
    return LinearNet(head, mean=0.4, std=0.3).eval(), torch.rand(5, 1, 2, 3, generator=gen)


def test_odin_without_perturbation_is_temperature_scaled_msp():
    model, x = _random_model()
    scores = make_scorer("odin", temperature=7.0, epsilon=0).score_batch(model, x)
    with torch.no_grad():
        expected = torch.softmax(model(x).double() / 7.0, dim=1).max(dim=1).values
    assert torch.allclose(scores, expected)


def test_odin_perturbation_raises_confidence_and_leaves_model_alone():
    model, x = _random_model()
    plain = make_scorer("odin", epsilon=0).score_batch(model, x)
    perturbed = make_scorer("odin").score_batch(model, x)
    assert (perturbed > plain).all()
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad
    assert perturbed.device.type == "cpu" and perturbed.shape == (5,)
