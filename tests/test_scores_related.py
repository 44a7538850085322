"""MODE and Forte: the feature-map summaries, hand-computed cases, independent cross-checks,
fitted state, bad input and the evaluate command."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import pairwise_distances
from sklearn.mixture import GaussianMixture
from torch import nn

from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.evaluate import Evaluator, evaluate
from unleash_ood.metrics import ood_metrics
from unleash_ood.models import HeadSplit, create_model
from unleash_ood.models.maps import (
    GRAM_POWERS,
    gram_rows,
    rank_one_removed,
    region_vectors,
    stage_means,
)
from unleash_ood.models.watermark import Watermarked
from unleash_ood.outputs import Outputs, forward_outputs
from unleash_ood.rng import numpy_rng
from unleash_ood.scores import make_scorer, parse_scorer_list
from unleash_ood.scores.distance import euclidean_knn_distance
from unleash_ood.scores.gram import range_deviation
from unleash_ood.scores.typicality import kde_whitening, typicality_statistics
from unleash_ood.tune import GRIDS

HEAD = nn.Linear(1, 1)  # neither scorer reads the head


def region_outputs(regions) -> Outputs:
    regions = torch.as_tensor(regions, dtype=torch.float32)
    n = len(regions)
    return Outputs(regions[:, 4], torch.zeros(n, 1), torch.full((n,), -1), {"regions": regions})


def feature_outputs(features) -> Outputs:
    features = torch.as_tensor(features, dtype=torch.float32)
    n = len(features)
    return Outputs(features, torch.zeros(n, 1), torch.full((n,), -1))


# ---------------------------------------------------------------- the feature-map summary


def test_region_vectors_of_a_4x4_map_by_hand():
    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    got = region_vectors(fmap)[0, :, 0]
    # Quadrants row-major (0 1 4 5, 2 3 6 7, 8 9 12 13, 10 11 14 15), whole map, centre 5 6 9 10.
    assert got.tolist() == [2.5, 4.5, 10.5, 12.5, 7.5, 7.5]


def test_region_vectors_centre_of_a_7x7_map_is_rows_and_columns_1_to_5():
    fmap = torch.zeros(1, 2, 7, 7)
    fmap[:, :, 1:6, 1:6] = 1.0
    got = region_vectors(fmap)
    assert got.shape == (1, 6, 2)
    assert torch.equal(got[0, 5], torch.ones(2))
    assert math.isclose(float(got[0, 4, 0]), 25 / 49, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "channels", "size"),
    [
        ("cnn", {"width": 4}, 1, 28),
        ("resnet18", {"width": 4}, 3, 32),
        ("wrn40_2", {"widen_factor": 1}, 3, 32),
        ("densenet100", {"growth_rate": 4}, 3, 32),
    ],
)
def test_every_builtin_model_pools_its_map_into_its_features(name, kwargs, channels, size):
    if name == "wrn40_2":
        model = create_model(name, 10, channels).eval()
    else:
        model = create_model(name, 10, channels, **kwargs).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        features, fmap = model.features_with_map(x)
        assert torch.allclose(features, model.features(x), atol=1e-6)
        assert torch.allclose(fmap.mean(dim=(2, 3)), features, atol=1e-6)
    assert model.exposes_map()


def test_headsplit_takes_the_input_of_the_last_adaptive_pool():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    net = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = HeadSplit(net, head="3", mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        features, fmap = model.features_with_map(x)
        assert torch.equal(fmap, trunk(x))
        assert torch.allclose(features, model.features(x))


class TimmStyle(nn.Module):
    """timm's contract: ``forward_features`` gives the map (or tokens), ``forward_head`` pools."""

    def __init__(self, tokens: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.tokens = tokens
        self.head = nn.Linear(4, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.stem(x)
        return fmap.flatten(2).transpose(1, 2) if self.tokens else fmap

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=1) if self.tokens else x.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_headsplit_takes_timms_forward_features_and_refuses_tokens():
    model = HeadSplit(TimmStyle(), head="head", mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        features, fmap = model.features_with_map(x)
        assert torch.equal(fmap, model.model.stem(x))
        assert torch.allclose(features, fmap.mean(dim=(2, 3)))
    vit_like = HeadSplit(TimmStyle(tokens=True), head="head", mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(UserError, match="no \\(N, C, H, W\\) feature map"):
        vit_like.features_with_map(x)


def test_a_watermarked_model_gives_the_maps_of_its_marked_input():
    inner = create_model("cnn", 10, 1, width=4).eval()
    pattern = torch.rand(1, 1, 28, 28) * 0.1
    marked = Watermarked(inner, pattern).eval()
    x = torch.rand(2, 1, 28, 28)
    assert marked.exposes_map()
    with torch.no_grad():
        features, stages = marked.features_with_stages(x)
        want_features, want_stages = inner.features_with_stages(x + pattern)
        assert torch.equal(features, want_features)
        assert all(torch.equal(a, b) for a, b in zip(stages, want_stages, strict=True))
        assert torch.equal(marked.features_with_map(x)[1], stages[-1])


def test_a_model_without_a_map_is_refused_in_one_line():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    model = HeadSplit(net, head="1", mean=(0, 0, 0), std=(1, 1, 1))
    assert not model.exposes_map()
    with pytest.raises(UserError, match="does not expose its last feature map"):
        model.features_with_map(torch.rand(1, 3, 2, 2))


def test_forward_outputs_keeps_the_region_vectors(tiny_checkpoint, tiny_benchmark):
    model = load_checkpoint(tiny_checkpoint)[0]
    data = tiny_benchmark.id_test
    plain = forward_outputs(model, data, batch_size=64)
    out = forward_outputs(model, data, batch_size=64, summaries=["regions"])
    assert plain.summaries == {}
    assert out.summaries["regions"].shape == (len(data), 6, model.feature_dim)
    assert torch.allclose(out.features, plain.features, atol=1e-6)
    assert torch.allclose(out.summaries["regions"][:, 4], out.features, atol=1e-5)  # global


# ---------------------------------------------------------------- MODE


def test_mode_by_hand():
    e1, e2 = [1.0, 0.0], [0.0, 3.0]  # normalised before matching
    train = region_outputs([[e1, e1, e1, e1, e1, e2]])
    diagonal = [1.0, 1.0]
    test = region_outputs([[e2] * 6, [diagonal] * 6, [e2, e1, e2, e2, e2, e2]])
    one = make_scorer("mode", k=1).fit(train, HEAD).score(test, HEAD)
    far = math.sqrt(2 - math.sqrt(2))  # |e1 - (1, 1) / sqrt 2|
    assert torch.allclose(one, torch.tensor([0.0, -far, 0.0], dtype=torch.float64), atol=1e-6)
    two = make_scorer("mode", k=2).fit(train, HEAD).score(test, HEAD)
    # e2 has one e2 in the bank, so its second neighbour is an e1; the e1 scale has five.
    expected = torch.tensor([-math.sqrt(2), -far, 0.0], dtype=torch.float64)
    assert torch.allclose(two, expected, atol=1e-6)


def test_mode_matches_a_brute_force_numpy_search():
    gen = torch.Generator().manual_seed(0)
    train = region_outputs(torch.rand(40, 6, 5, generator=gen))
    test = region_outputs(torch.rand(15, 6, 5, generator=gen) * torch.rand(15, 6, 1))
    got = make_scorer("mode", k=7).fit(train, HEAD).score(test, HEAD).numpy()

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    bank = unit(train.summaries["regions"].double().numpy().reshape(-1, 5))
    queries = unit(test.summaries["regions"].double().numpy())
    distances = np.linalg.norm(queries[:, :, None, :] - bank[None, None], axis=-1)
    kth = np.sort(distances, axis=-1)[..., 6]
    np.testing.assert_allclose(got, -kth.min(axis=1), atol=1e-5)


def test_mode_bank_fraction_keeps_every_scale_of_evenly_spaced_images():
    regions = torch.rand(10, 6, 3)
    scorer = make_scorer("mode", k=1, bank_fraction=0.2).fit(region_outputs(regions), HEAD)
    expected = nn.functional.normalize(regions[[0, 5]].reshape(12, 3), dim=1)
    assert torch.allclose(scorer.bank_, expected)


def test_mode_parameter_change_forgets_the_bank():
    train = region_outputs(torch.rand(10, 6, 3))
    scorer = make_scorer("mode", k=3).fit(train, HEAD)
    assert scorer.with_params(bank_fraction=0.5).bank_ is None
    copy = scorer.with_params(k=2)
    assert copy.bank_ is None and scorer.bank_ is not None
    scorer.k = 2
    with pytest.raises(UserError, match="mode must be fit"):
        scorer.score(train, HEAD)
    refit = scorer.fit(train, HEAD).score(train, HEAD)
    assert torch.equal(refit, copy.fit(train, HEAD).score(train, HEAD))


def test_mode_bad_input():
    with pytest.raises(UserError, match="mode: k must be an integer"):
        make_scorer("mode", k=0)
    with pytest.raises(UserError, match="k=13 is larger than the 12 ID training vectors"):
        make_scorer("mode", k=13).fit(region_outputs(torch.rand(2, 6, 3)), HEAD)
    with pytest.raises(UserError, match="reads the 'regions' summary"):
        make_scorer("mode").fit(feature_outputs(torch.rand(20, 3)), HEAD)
    with pytest.raises(UserError, match="at least 2 x 2"):
        region_vectors(torch.rand(2, 3, 1, 1))


def test_evaluator_refuses_mode_on_a_model_without_a_map(tiny_benchmark):
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    model = HeadSplit(net, head="1", mean=(0.5,), std=(0.5,))
    with pytest.raises(UserError, match="mode needs the model's last feature map"):
        Evaluator(model, tiny_benchmark, "msp,mode", device="cpu", progress=False)
    with pytest.warns(UserWarning, match="'all' leaves out mode, rankfeat, mahalanobis_layers"):
        every = Evaluator(model, tiny_benchmark, "all", device="cpu", progress=False)
    names = {s.name for s in every.scorers}
    assert {"msp", "knn", "forte"} <= names and not names & {"mode", "rankfeat", "gram"}


def test_evaluator_checks_neighbour_counts_before_any_forward_pass(
    tiny_benchmark, tiny_checkpoint, monkeypatch
):
    """A k above the ID training data is refused by name and left out of "all", all before
    the first forward pass (fitting would only fail after them)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    flat = HeadSplit(net, head="1", mean=(0.5,), std=(0.5,))
    cnn, _ = load_checkpoint(tiny_checkpoint, "cpu")

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the scorers were checked")

    monkeypatch.setattr(Evaluator, "_forward", no_forward)
    kwargs = {"device": "cpu", "progress": False, "fit_samples": 40}
    with pytest.raises(UserError, match=r"^knn: k=50 is larger than the 40 ID training samples"):
        Evaluator(flat, tiny_benchmark, "msp,knn", **kwargs)
    with pytest.raises(UserError, match=r"^nnguide: k=100 is larger than the 40 ID training"):
        Evaluator(flat, tiny_benchmark, "nnguide", **kwargs)
    with pytest.raises(UserError, match=r"^mode: k=241 is larger than the 240 ID training vectors"):
        Evaluator(cnn, tiny_benchmark, [make_scorer("mode", k=241)], **kwargs)
    with pytest.warns(UserWarning) as caught:  # the feature-map scorers are left out too
        every = Evaluator(flat, tiny_benchmark, "all", **kwargs)
    left_out = "leaves out knn (k=50 is larger than the 40 ID training samples; use a smaller k)"
    assert any(left_out in str(w.message) for w in caught)
    names = {s.name for s in every.scorers}
    assert "msp" in names and not names & {"knn", "nnguide"}
    fits = [make_scorer("knn", k=40), make_scorer("mode", k=240)]
    assert len(Evaluator(cnn, tiny_benchmark, fits, **kwargs).scorers) == 2
    with pytest.raises(UserError, match=r"^knn: k=1101 is larger than the 1100 ID training"):
        Evaluator(flat, tiny_benchmark, [make_scorer("knn", k=1101)], device="cpu")


# ---------------------------------------------------------------- Forte


def test_typicality_statistics_by_hand():
    reference = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    radii = euclidean_knn_distance(reference, reference, 2)  # k = 1, the point itself first
    assert radii.tolist() == [1.0, 1.0, 2.0, 3.0]
    queries = torch.tensor([[2.0], [10.0], [5.5]], dtype=torch.float64)
    rho = torch.tensor([1.5, 0.5, 0.6], dtype=torch.float64)
    got = typicality_statistics(queries, reference, radii, rho, k=1)
    # q = 2: distances 2 1 1 4; inside reference balls: only r = 3 (1 < 2); within rho: 1, 3.
    # q = 10: distances 10 9 7 4, inside nothing. q = 5.5: 5.5 4.5 2.5 0.5, only r = 6.
    expected = [[0.5, 0.25, 1, 1], [0, 0, 0, 0], [0.25, 0.25, 1, 1]]
    assert got.tolist() == expected


def test_euclidean_knn_matches_sklearn_on_unnormalised_features():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 6, generator=gen, dtype=torch.float64) * 4 + 2
    queries = torch.randn(50, 6, generator=gen, dtype=torch.float64) * 4
    want = np.sort(pairwise_distances(queries.numpy(), bank.numpy()), axis=1)[:, 9]
    np.testing.assert_allclose(euclidean_knn_distance(queries, bank, 10).numpy(), want, rtol=1e-9)


def authors_statistics(real: np.ndarray, fake: np.ndarray, k: int) -> np.ndarray:
    """Their per-point precision/recall/density/coverage, written from the definitions in
    plain numpy: radii among each set itself, the point itself excluded."""
    real_radii = np.sort(pairwise_distances(real), axis=1)[:, k]
    fake_radii = np.sort(pairwise_distances(fake), axis=1)[:, k]
    d = pairwise_distances(real, fake)
    inside = d < real_radii[:, None]
    recall = (d < fake_radii).sum(0) / len(real)
    density = inside.sum(0) / (k * len(real))
    precision = inside.any(0).astype(float)
    coverage = (d.min(0) < fake_radii).astype(float)
    return np.column_stack([recall, density, precision, coverage])


def test_forte_matches_an_independent_numpy_sklearn_computation():
    gen = torch.Generator().manual_seed(2)
    train = feature_outputs(torch.rand(400, 5, generator=gen) * 3)
    test = feature_outputs(torch.rand(120, 5, generator=gen) * 4)
    scorer = make_scorer("forte", k=5, density="gmm", radii="batch", components=3)
    scorer.fit(train, HEAD)
    order = numpy_rng(0, "forte-split").permutation(400)
    features = train.features.double().numpy()
    reference, fit_part = features[order[:200]], features[order[200:]]
    fit_stats = authors_statistics(reference, fit_part, 5)
    test_stats = authors_statistics(reference, test.features.double().numpy(), 5)
    np.testing.assert_allclose(scorer.statistics(test).numpy(), test_stats, atol=1e-12)
    shift, scale = fit_stats.mean(0), fit_stats.std(0)
    scale[scale == 0] = 1
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(
        (fit_stats - shift) / scale
    )
    want = gmm.score_samples((test_stats - shift) / scale)
    np.testing.assert_allclose(scorer.score(test, HEAD).numpy(), want, rtol=1e-6)


def test_forte_kde_is_scipys_gaussian_kde_with_their_bandwidth_choice():
    from scipy.stats import gaussian_kde

    gen = np.random.default_rng(5)
    z = gen.normal(size=(300, 4)) @ np.array(
        [[1.0, 0.5, 0, 0], [0, 1.0, 0.3, 0], [0, 0, 2.0, 0], [0.2, 0, 0, 0.5]]
    )
    queries = gen.normal(size=(50, 4)) * 1.5
    whiten, kde = kde_whitening(z)
    # their evaluate_kde: the bandwidth rule with the higher mean training log-density
    theirs = max(
        (gaussian_kde(z.T, bw_method=bw) for bw in ("scott", "silverman")),
        key=lambda k: k.logpdf(z.T).mean(),
    )
    assert kde.bandwidth == pytest.approx(theirs.factor)
    gap = kde.score_samples(queries @ whiten) - theirs.logpdf(queries.T)
    np.testing.assert_allclose(gap, gap[0], atol=1e-9)  # the same density up to a constant
    constant = np.column_stack([z[:, :3], np.zeros(300)])  # scipy's would be singular
    whiten, kde = kde_whitening(constant)
    assert np.isfinite(kde.score_samples(queries @ whiten)).all()


def test_forte_reference_radii_make_scores_independent_of_the_batch():
    gen = torch.Generator().manual_seed(3)
    train = feature_outputs(torch.rand(200, 4, generator=gen))
    test = feature_outputs(torch.rand(60, 4, generator=gen) * 1.5)
    half = feature_outputs(test.features[:30])
    fixed = make_scorer("forte").fit(train, HEAD)
    assert torch.equal(fixed.score(half, HEAD), fixed.score(test, HEAD)[:30])
    batch = fixed.with_params(radii="batch").fit(train, HEAD)
    assert not torch.equal(batch.score(half, HEAD), batch.score(test, HEAD)[:30])


def shifted_gaussians(shift: float) -> tuple[Outputs, Outputs, Outputs]:
    """ID training and test samples from a standard Gaussian, OOD ones shifted by ``shift``."""
    gen = torch.Generator().manual_seed(4)
    sets = [torch.randn(n, 3, generator=gen) for n in (600, 300, 300)]
    return feature_outputs(sets[0]), feature_outputs(sets[1]), feature_outputs(sets[2] + shift)


def auroc(scorer, train: Outputs, id_test: Outputs, ood: Outputs) -> float:
    scorer.fit(train, HEAD)
    return ood_metrics(scorer.score(id_test, HEAD), scorer.score(ood, HEAD))["auroc"]


@pytest.mark.parametrize("density", ["kde", "gmm", "ocsvm"])
def test_forte_with_batch_radii_tells_a_far_cluster_from_id_samples(density):
    scorer = make_scorer("forte", density=density, radii="batch")
    assert auroc(scorer, *shifted_gaussians(8.0)) == 1.0


def test_forte_defaults_tell_far_and_near_shifts_from_id_samples():
    assert auroc(make_scorer("forte"), *shifted_gaussians(8.0)) > 0.95
    assert auroc(make_scorer("forte"), *shifted_gaussians(2.0)) > 0.8


def test_forte_gmm_with_reference_radii_favours_the_all_outside_statistics():
    """Why KDE is the default: the mixture collapses onto the repeated statistics of samples
    outside every ball, so a far cluster scores above the ID samples."""
    assert auroc(make_scorer("forte", density="gmm"), *shifted_gaussians(8.0)) < 0.1


def test_forte_with_reference_radii_sees_a_far_sample_outside_every_ball():
    """Outside every reference ball, precision and density are 0 however far the sample is,
    and coverage, measured in a fixed ID set, is that of an ID sample."""
    train, _, far = shifted_gaussians(8.0)
    stats = make_scorer("forte").fit(train, HEAD).statistics(far)
    assert torch.equal(stats[:, 1:3], torch.zeros(len(far), 2, dtype=torch.float64))
    assert bool((stats[:, 3] == 1).all())  # the nearest reference is within its radius


@pytest.mark.parametrize(
    "change", [{"k": 3}, {"density": "gmm"}, {"radii": "batch"}, {"components": 2}, {"seed": 1}]
)
def test_forte_parameter_change_forgets_the_fit(change):
    train = feature_outputs(torch.rand(100, 3))
    scorer = make_scorer("forte").fit(train, HEAD)
    copy = scorer.with_params(**change)
    assert all(getattr(copy, f.name) is None for f in dataclasses.fields(copy) if f.name[-1] == "_")
    for param, value in change.items():
        setattr(scorer, param, value)
    with pytest.raises(UserError, match="forte must be fit"):
        scorer.score(train, HEAD)


def test_forte_bad_input():
    with pytest.raises(UserError, match="forte: density must be one of kde, gmm, ocsvm"):
        make_scorer("forte", density="nope")
    with pytest.raises(UserError, match="forte: radii must be one of reference, batch"):
        parse_scorer_list("forte:radii=fixed")
    with pytest.raises(UserError, match="must be numbers"):
        parse_scorer_list("forte:k=five")
    with pytest.raises(UserError, match="too few for k=5"):
        make_scorer("forte").fit(feature_outputs(torch.rand(10, 2)), HEAD)
    scorer = make_scorer("forte", radii="batch", k=3).fit(feature_outputs(torch.rand(40, 2)), HEAD)
    with pytest.raises(UserError, match="more than k=3 samples per score call"):
        scorer.score(feature_outputs(torch.rand(3, 2)), HEAD)


def test_word_parameters_parse_from_the_command_line_string():
    (scorer,) = parse_scorer_list("forte:density=ocsvm:radii=batch:k=3")
    assert scorer.params() == {
        "k": 3,
        "density": "ocsvm",
        "radii": "batch",
        "components": 8,
        "seed": 0,
    }


# ---------------------------------------------------------------- RankFeat


def test_rank_one_removed_by_hand():
    # One image, two channels over two positions: rows (3, 0) and (0, 1). The top singular
    # component is 3 e1 e1^T; what is left is (0, 0), (0, 1), averaged over positions.
    fmap = torch.tensor([[[[3.0, 0.0]], [[0.0, 1.0]]]])
    assert rank_one_removed(fmap).tolist() == [[0.0, 0.5]]


def test_rankfeat_matches_numpy_svd_and_energy():
    gen = torch.Generator().manual_seed(5)
    fmap = torch.rand(4, 3, 2, 3, generator=gen)
    head = nn.Linear(3, 5)
    x = fmap.double().numpy().reshape(4, 3, 6)
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    kept = (x - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).mean(axis=2)
    logits = kept @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
    want = np.log(np.exp(logits / 2).sum(axis=1)) * 2
    summaries = {"rank_one_removed": rank_one_removed(fmap)}
    out = Outputs(torch.zeros(4, 3), torch.zeros(4, 5), torch.full((4,), -1), summaries)
    got = make_scorer("rankfeat", temperature=2.0).score(out, head)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_rankfeat_refuses_a_head_that_does_not_read_the_pooled_map():
    summaries = {"rank_one_removed": torch.zeros(2, 3)}
    out = Outputs(torch.zeros(2, 4), torch.zeros(2, 2), torch.full((2,), -1), summaries)
    with pytest.raises(UserError, match="head reads 4 features, not the 3 channels"):
        make_scorer("rankfeat").score(out, nn.Linear(4, 2))
    with pytest.raises(UserError, match="rankfeat: temperature must be a number"):
        make_scorer("rankfeat", temperature=0)


# ---------------------------------------------------------------- multi-layer Mahalanobis


def test_stage_means_by_hand():
    first = torch.arange(4.0).view(1, 1, 2, 2)  # one channel, mean 1.5
    last = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    assert stage_means([first, last]).tolist() == [[[1.5, 0.0], [2.0, 4.0]]]


def numpy_mahalanobis(train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Closest-class squared Mahalanobis distance with a tied covariance, plain numpy."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    precision = np.linalg.pinv(centred.T @ centred / len(train), hermitian=True)
    diff = test[:, None, :] - means[None]
    return np.einsum("nkd,de,nke->nk", diff, precision, diff).min(axis=1)


def stage_outputs(stages: torch.Tensor, labels: torch.Tensor) -> Outputs:
    n = len(stages)
    return Outputs(stages[:, -1], torch.zeros(n, 1), labels, {"stage_means": stages})


def test_layer_mahalanobis_matches_numpy_per_layer_and_scaled():
    gen = torch.Generator().manual_seed(6)
    labels = torch.arange(90) % 3
    train_stages = torch.rand(90, 2, 4, generator=gen) + labels[:, None, None] * 0.5
    train_stages[:, 0, 3] = 0  # a zero-padded channel of the narrower first stage
    test_stages = torch.rand(12, 2, 4, generator=gen) * 2
    test_stages[:, 0, 3] = 0
    scorer = make_scorer("mahalanobis_layers").fit(stage_outputs(train_stages, labels), HEAD)
    got = scorer.score(stage_outputs(test_stages, torch.full((12,), -1)), HEAD).numpy()
    want = 0.0
    for layer in range(2):
        tr, te = train_stages[:, layer].double().numpy(), test_stages[:, layer].double().numpy()
        scale = numpy_mahalanobis(tr, labels.numpy(), tr).mean()
        want = want - numpy_mahalanobis(tr, labels.numpy(), te) / scale
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_layer_mahalanobis_on_one_stage_ranks_as_mahalanobis():
    gen = torch.Generator().manual_seed(7)
    labels = torch.arange(60) % 2
    train = torch.rand(60, 1, 3, generator=gen) + labels[:, None, None]
    test = torch.rand(10, 1, 3, generator=gen) * 2
    layered = make_scorer("mahalanobis_layers").fit(stage_outputs(train, labels), HEAD)
    plain = make_scorer("mahalanobis").fit(Outputs(train[:, 0], torch.zeros(60, 1), labels), HEAD)
    a = layered.score(stage_outputs(test, torch.full((10,), -1)), HEAD)
    b = plain.score(feature_outputs(test[:, 0]), HEAD)
    assert torch.allclose(a * layered.scales_[0], b, rtol=1e-5)


def test_layer_mahalanobis_needs_labels_and_the_stage_means(tiny_checkpoint, tiny_benchmark):
    stages = torch.rand(4, 2, 3)
    with pytest.raises(UserError, match="mahalanobis_layers needs the class labels"):
        make_scorer("mahalanobis_layers").fit(stage_outputs(stages, torch.full((4,), -1)), HEAD)
    with pytest.raises(UserError, match="reads the 'stage_means' summary"):
        make_scorer("mahalanobis_layers").fit(
            Outputs(torch.rand(4, 3), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), HEAD
        )
    model = load_checkpoint(tiny_checkpoint)[0]
    out = forward_outputs(model, tiny_benchmark.id_test, summaries=["stage_means"])
    means = out.summaries["stage_means"]
    assert means.shape == (len(out), 3, model.feature_dim)  # 28, 14 and 7 pixels
    assert torch.allclose(means[:, -1], out.features, atol=1e-5)


# ---------------------------------------------------------------- Gram


def test_gram_rows_by_hand():
    # One image, channels (1, 2) and (0, 3). p = 1: G = [[5, 6], [6, 9]], row sums 11, 15.
    # p = 2: squares (1, 4) and (0, 9), G = [[17, 36], [36, 81]], row sums 53, 117, rooted.
    fmap = torch.tensor([[[[1.0, 2.0]], [[0.0, 3.0]]]])
    rows = gram_rows([fmap]).double()
    assert rows.shape == (1, 1, len(GRAM_POWERS), 2)
    assert torch.allclose(rows[0, 0, 0], torch.tensor([11.0, 15.0], dtype=torch.float64))
    expected = torch.tensor([53.0, 117.0], dtype=torch.float64).sqrt()
    assert torch.allclose(rows[0, 0, 1], expected, rtol=1e-6)


def test_gram_rows_match_the_authors_full_gram_matrices():
    gen = torch.Generator().manual_seed(8)
    stages = [torch.randn(3, 2, 3, 3, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)]
    got = gram_rows(stages).double().numpy()
    for stage, fmap in enumerate(stages):
        x = fmap.double().numpy().reshape(3, fmap.shape[1], -1)
        for i, p in enumerate(GRAM_POWERS):
            xp = x**p
            r = (xp @ xp.transpose(0, 2, 1)).sum(axis=2)
            want = np.sign(r) * np.abs(r) ** (1 / p)
            np.testing.assert_allclose(got[:, stage, i, : fmap.shape[1]], want, rtol=1e-5)
            assert not got[:, stage, i, fmap.shape[1] :].any()  # zero padding


def test_range_deviation_by_hand():
    low, high = torch.tensor(1.0), torch.tensor(3.0)
    got = range_deviation(torch.tensor([0.0, 2.0, 4.5]), low, high)
    assert torch.allclose(got, torch.tensor([1 / (1 + 1e-6), 0.0, 1.5 / (3 + 1e-6)]))


def gram_outputs(rows: torch.Tensor, logits: torch.Tensor) -> Outputs:
    n = len(rows)
    return Outputs(torch.zeros(n, 1), logits, torch.full((n,), -1), {"gram_rows": rows})


def test_gram_matches_an_independent_numpy_computation():
    gen = torch.Generator().manual_seed(9)
    train = gram_outputs(
        torch.rand(200, 2, 3, 4, generator=gen), torch.randn(200, 3, generator=gen)
    )
    test = gram_outputs(torch.rand(30, 2, 3, 4, generator=gen) * 1.5, torch.randn(30, 3))
    got = make_scorer("gram", holdout=0.2).fit(train, HEAD).score(test, HEAD).numpy()

    rows, logits = train.summaries["gram_rows"].double().numpy(), train.logits.double().numpy()
    order = numpy_rng(0, "gram-holdout").permutation(200)
    held, fit = order[:40], order[40:]
    predicted = logits.argmax(1)
    low = {c: rows[fit][predicted[fit] == c].min(0) for c in range(3)}
    high = {c: rows[fit][predicted[fit] == c].max(0) for c in range(3)}

    def deviations(r, z):
        prob = np.exp(z - z.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        out = []
        for v, p in zip(r, prob, strict=True):
            c = p.argmax()
            d = np.maximum(low[c] - v, 0) / np.abs(low[c] + 1e-6)
            d += np.maximum(v - high[c], 0) / np.abs(high[c] + 1e-6)
            out.append(d.sum(axis=(1, 2)) / p.max())
        return np.array(out)

    scale = deviations(rows[held], logits[held]).mean(0) + 1e-7
    test_rows = test.summaries["gram_rows"].double().numpy()
    want = -(deviations(test_rows, test.logits.double().numpy()) / scale).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_gram_parameters_and_bad_input():
    gen = torch.Generator().manual_seed(10)
    train = gram_outputs(torch.rand(50, 1, 2, 3, generator=gen), torch.randn(50, 2, generator=gen))
    scorer = make_scorer("gram").fit(train, HEAD)
    assert scorer.with_params(seed=1).low_ is None
    scorer.holdout = 0.5
    with pytest.raises(UserError, match="gram must be fit"):
        scorer.score(train, HEAD)
    with pytest.raises(UserError, match="gram: holdout must be a number in"):
        make_scorer("gram", holdout=1.0)
    with pytest.raises(UserError, match="leaves no samples"):
        make_scorer("gram", holdout=0.1).fit(
            gram_outputs(torch.rand(3, 1, 2, 3), torch.randn(3, 2)), HEAD
        )


def test_gram_ranks_a_sample_outside_the_ranges_below_id_samples(tiny_checkpoint, tiny_benchmark):
    model = load_checkpoint(tiny_checkpoint)[0]
    train = forward_outputs(model, tiny_benchmark.id_train, summaries=["gram_rows"])
    scorer = make_scorer("gram").fit(train, model.head)
    rows = train.summaries["gram_rows"][:20]
    inside = gram_outputs(rows, train.logits[:20])
    outside = gram_outputs(rows * 3 + 1, train.logits[:20])
    assert scorer.score(inside, model.head).min() > scorer.score(outside, model.head).max()


# ---------------------------------------------------------------- evaluation


def test_tuning_grids():
    assert GRIDS["mode"] == {"k": (1, 5, 10, 50)}
    assert GRIDS["forte"] == {"k": (3, 5, 10)}


def test_cache_keeps_the_region_vectors(tiny_checkpoint, tiny_benchmark, tmp_path):
    model = load_checkpoint(tiny_checkpoint)[0]
    kwargs = {"device": "cpu", "progress": False, "cache_dir": tmp_path}
    first = evaluate(model, tiny_benchmark, "knn,mode", **kwargs)
    again = evaluate(model, tiny_benchmark, "mode", **kwargs)
    assert first.row("mode") == again.row("mode")
    folders = {f.parent for f in tmp_path.rglob("labels.npy")}
    assert folders and all((f / "summary-regions.npy").exists() for f in folders)


def test_evaluate_command_with_mode_and_forte(capsys, fmnist_dir, tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--data-dir",
            str(fmnist_dir),
            "--scores",
            "msp,mode,forte:density=gmm,rankfeat,mahalanobis_layers,gram",
            "--out",
            str(out_dir),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads((out_dir / "metrics.json").read_text())["rows"]
    for scorer in ("mode", "forte", "rankfeat", "mahalanobis_layers", "gram"):
        means = [r for r in rows if r["scorer"] == scorer and r["dataset"] == "mean"]
        assert len(means) == 1 and 0.0 <= means[0]["auroc"] <= 1.0


def test_evaluate_command_refuses_a_bad_forte_value_before_work(capsys, fmnist_dir, tmp_path):
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "missing"),
            "--data-dir",
            str(fmnist_dir),
            "--scores",
            "forte:density=gauss",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "density must be one of" in err
    assert not (tmp_path / "out").exists()
