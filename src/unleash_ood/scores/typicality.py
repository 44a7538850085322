"""Forte: per-sample typicality statistics against ID reference features, and a density model
fitted on the statistics of ID samples.

Ganguly, Morningstar, Yu and Chaudhary, "Forte: Finding Outliers with Representation
Typicality Estimation", arXiv 2410.01322, 2024 (ICLR 2025); code: github.com/DebarghaG/forte
(``prdc_per_point.py``, ``main.py``, ``eval.py``). The statistics are the per-sample forms of
precision, recall, density and coverage of Naeem, Oh, Uh, Choi and Yoo, "Reliable Fidelity
and Diversity Metrics for Generative Models", ICML 2020.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.rng import numpy_rng
from unleash_ood.scores.base import Scorer, check_range
from unleash_ood.scores.distance import euclidean_knn_distance

DENSITIES = ("kde", "gmm", "ocsvm")
RADII = ("reference", "batch")
# Query rows and reference rows of one tile of the ball counts: 4 MiB of float64 distances.
_QUERY_ROWS = 256
_REFERENCE_ROWS = 2048
# nu of the one-class SVM: what the authors' selection by training inlier ratio (about
# 1 - nu) picks from their grid.
_OCSVM_NU = 0.01


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.square().sum(1)[:, None] + b.square().sum(1) - 2 * a @ b.T).clamp_min(0)


def typicality_statistics(
    queries: torch.Tensor,
    reference: torch.Tensor,
    reference_radii: torch.Tensor,
    query_radii: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """``(N, 4)`` columns recall, density, precision, coverage of each query (their order).

    With ``d_ij = |q_j - r_i|``, ``R_i`` the distance of reference ``r_i`` to its ``k``-th
    nearest other reference and ``rho_j`` the query's own k-NN radius, over ``M`` references:
    ``precision_j = 1[exists i: d_ij < R_i]``, ``density_j = #{i: d_ij < R_i} / (k M)``,
    ``recall_j = #{i: d_ij < rho_j} / M`` and ``coverage_j = 1[min_i d_ij < rho_j]``.
    Tiled over queries and references, so memory beyond the inputs is one tile.
    """
    inside_reference, inside_query, nearest = [], [], []
    ref_sq = reference_radii.square()
    query_sq = query_radii.square()
    for chunk, rho in zip(queries.split(_QUERY_ROWS), query_sq.split(_QUERY_ROWS), strict=True):
        in_ref = chunk.new_zeros(len(chunk))
        in_query = chunk.new_zeros(len(chunk))
        closest = chunk.new_full((len(chunk),), float("inf"))
        parts = zip(reference.split(_REFERENCE_ROWS), ref_sq.split(_REFERENCE_ROWS), strict=True)
        for part, part_sq in parts:
            d2 = _squared_distances(chunk, part)
            in_ref += (d2 < part_sq).sum(1)
            in_query += (d2 < rho[:, None]).sum(1)
            closest = torch.minimum(closest, d2.amin(1))
        inside_reference.append(in_ref)
        inside_query.append(in_query)
        nearest.append(closest < rho)
    in_ref, in_query = torch.cat(inside_reference), torch.cat(inside_query)
    m = len(reference)
    return torch.stack(
        [in_query / m, in_ref / (k * m), (in_ref > 0).double(), torch.cat(nearest).double()],
        dim=1,
    )


def kde_whitening(z: np.ndarray) -> tuple[np.ndarray, object]:
    """The authors' kernel density of the rows of ``z``: scipy's ``gaussian_kde``, whose
    kernel covariance is the data covariance times ``factor ** 2``, with Scott's or
    Silverman's factor, whichever gives the higher mean training log-density (their
    ``evaluate_kde``). Returns ``W`` and a scikit-learn ``KernelDensity`` fitted on ``z @ W``
    with bandwidth ``factor``, which gives the same log-density up to a constant: ``W`` is the
    inverse Cholesky factor of the covariance, so the kernel becomes isotropic. A column of
    zero variance gets unit variance (scipy's covariance would be singular there)."""
    from sklearn.neighbors import KernelDensity

    n, d = z.shape
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    constant = np.diag(cov) == 0
    cov[constant, constant] = 1.0
    whiten = np.linalg.inv(np.linalg.cholesky(cov)).T
    w = z @ whiten
    factors = (n ** (-1 / (d + 4)), (n * (d + 2) / 4) ** (-1 / (d + 4)))  # Scott, Silverman
    fits = [KernelDensity(bandwidth=f).fit(w) for f in factors]
    best = max(fits, key=lambda kde: kde.score_samples(w).mean())
    return whiten, best


@dataclass
class Forte(Scorer):
    """Log-density, under a model fitted on ID statistics, of a sample's typicality
    statistics (precision, recall, density, coverage; :func:`typicality_statistics`).

    Fitting (ID training outputs, no labels): split them, seeded, into a reference half and a
    fit half (their ``train_test_split(test_size=0.5)``); ``R_i`` is each reference's distance
    to its ``k``-th nearest other reference (Euclidean, raw features, as in their code). The
    statistics of the fit half, standardised, train the ``density`` model: ``kde`` (default;
    Gaussian kernel density with their kernel, score its log-density; see
    :func:`kde_whitening`), ``gmm`` (a
    full-covariance Gaussian mixture of ``components`` components, score its log-likelihood)
    or ``ocsvm`` (RBF one-class SVM, ``gamma='auto'``, ``nu = 0.01``, score its decision
    function). ``k = 5`` is their default.

    Why KDE by default: precision and coverage are 0 or 1, and recall and density are 0 for
    every sample outside all balls, so the ID statistics hold exact repeated points. A
    mixture component collapses onto such a point (its covariance shrinks to the
    regularisation), and its likelihood there outgrows that of the typical ID statistics; the
    rare all-outside combination is exactly what a far OOD sample gets, so with fixed radii
    the GMM ranks far samples above ID ones (AUROC 0.02 on a shifted Gaussian in the tests).
    A kernel density weighs each repeated point by its count, as a density should.

    Recall and coverage need each query's own radius ``rho_j``, and in the authors' code that
    is its k-th nearest neighbour among the other samples scored with it (a fused set of ID
    held-out and OOD images), so a sample's score depends on what it is scored with. Here
    ``radii`` chooses: ``reference`` (default) measures ``rho_j`` in the fit half, a set fixed
    at fit time, so every score is a function of the sample alone; ``batch`` is their
    transductive rule over the outputs of one ``score`` call (the evaluator scores the ID test
    set and each OOD set separately, not fused). The fit half's own radii are the same under
    both (the k-th nearest other sample of the fit half). What fixed radii cost: measured in a
    set of the same distribution as the references, a query's ball holds about ``k``
    references wherever it lies, so recall is about ``k / M`` and coverage about 1 for every
    sample, and the score rests on precision and density, which are 0 for every sample outside
    all reference balls however far it is (on the shipped fmnist model: AUROC 65 with fixed
    radii, 90 with ``batch`` radii and the KDE, 95 with ``batch`` and the GMM; KNN 97; see
    ``benchmarks/RESULTS.md``). Under ``batch`` radii the radii also shrink as the scored set
    grows, so ID sets of other sizes than the fit half get shifted statistics.

    Cost: fitting is quadratic in the ID training set (k-NN radii and ball counts of half of
    it against the other half), scoring linear in it per sample; ``components`` is used by
    ``gmm`` only.

    Features: the classifier's own penultimate features. The paper extracts them with several
    self-supervised encoders (CLIP, ViT-MSN, DINOv2) and concatenates the statistics of each;
    those weights are not available offline, so every offline result of this library uses the
    classifier's features.

    Deviations from the authors' code: the statistics are standardised with the fit half's
    mean and standard deviation before the density model (theirs are not, which leaves recall
    and density, of order ``1 / M``, below the GMM's covariance regularisation); the GMM has
    a fixed number of components (their choice among 1 to 256 by training log-likelihood, which
    grows with the count, picks the largest); the KDE is scipy's ``gaussian_kde`` computed
    through scikit-learn on whitened statistics (the same log-density up to a constant), with
    a statistic that is constant on the fit half given unit variance where scipy's fails (as
    precision often is); the one-class SVM takes the ``nu`` their selection picks. The
    distances are exact, tiled, in float64.
    """

    name = "forte"
    requires_fit = True
    k: int = 5
    density: str = "kde"
    radii: str = "reference"
    components: int = 8
    seed: int = 0
    reference_: torch.Tensor | None = field(default=None, init=False, repr=False)
    reference_radii_: torch.Tensor | None = field(default=None, init=False, repr=False)
    companions_: torch.Tensor | None = field(default=None, init=False, repr=False)
    shift_: np.ndarray | None = field(default=None, init=False, repr=False)
    scale_: np.ndarray | None = field(default=None, init=False, repr=False)
    whiten_: np.ndarray | None = field(default=None, init=False, repr=False)
    model_: object | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self, "k", 1, integer=True, include_low=True)
        check_range(self, "components", 1, integer=True, include_low=True)
        check_range(self, "seed", 0, integer=True, include_low=True)
        for param, choices in (("density", DENSITIES), ("radii", RADII)):
            if getattr(self, param) not in choices:
                raise UserError(
                    f"forte: {param} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, param)!r}"
                )

    def fit(self, train: Outputs, head: nn.Linear) -> Forte:
        half = len(train) // 2
        if half <= self.k or half < self.components:
            raise UserError(
                f"forte: {len(train)} ID training samples are too few for k={self.k} and "
                f"components={self.components} (each half must hold more than k and at least "
                f"components samples); use a smaller k"
            )
        order = torch.from_numpy(numpy_rng(self.seed, "forte-split").permutation(len(train)))
        features = train.features.double()
        reference, companions = features[order[:half]], features[order[half:]]
        reference_radii = euclidean_knn_distance(reference, reference, self.k + 1)
        own_radii = euclidean_knn_distance(companions, companions, self.k + 1)
        stats = typicality_statistics(
            companions, reference, reference_radii, own_radii, self.k
        ).numpy()
        shift, scale = stats.mean(0), stats.std(0)
        scale[scale == 0] = 1.0
        z = (stats - shift) / scale
        if self.density == "kde":
            self.whiten_, self.model_ = kde_whitening(z)
        else:
            self.whiten_, self.model_ = np.eye(z.shape[1]), self._density_model().fit(z)
        self.reference_, self.reference_radii_, self.companions_ = (
            reference,
            reference_radii,
            companions,
        )
        self.shift_, self.scale_ = shift, scale
        return self

    def statistics(self, outputs: Outputs) -> torch.Tensor:
        """The ``(N, 4)`` typicality statistics of ``outputs`` against the fitted reference."""
        self._check_fitted()
        x = outputs.features.double()
        if self.radii == "batch":
            if len(x) <= self.k:
                raise UserError(
                    f"forte with radii=batch needs more than k={self.k} samples per score call; "
                    f"got {len(x)}"
                )
            radii = euclidean_knn_distance(x, x, self.k + 1)
        else:
            radii = euclidean_knn_distance(x, self.companions_, self.k)
        return typicality_statistics(x, self.reference_, self.reference_radii_, radii, self.k)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        stats = (self.statistics(outputs).numpy() - self.shift_) / self.scale_ @ self.whiten_
        model = self.model_
        raw = (
            model.decision_function(stats)
            if self.density == "ocsvm"
            else model.score_samples(stats)
        )
        return torch.from_numpy(np.asarray(raw, dtype=np.float64))

    def _density_model(self) -> object:
        from sklearn.mixture import GaussianMixture
        from sklearn.svm import OneClassSVM

        if self.density == "gmm":
            return GaussianMixture(self.components, covariance_type="full", random_state=self.seed)
        return OneClassSVM(kernel="rbf", gamma="auto", nu=_OCSVM_NU)
