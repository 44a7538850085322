"""Every scorer against a plain float64 reference implementation on fixed random features.

The references are written for clarity, not speed (loops over classes, full sorts, explicit
differences), so a faster scorer that changes a score by more than 1e-6 relative fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from unleash_ood.models.base import Classifier
from unleash_ood.outputs import Outputs
from unleash_ood.scores import make_scorer

N_TRAIN, N_TEST, DIM, CLASSES = 4000, 300, 24, 5


def _features(n: int, gen: torch.Generator) -> torch.Tensor:
    """Non-negative, post-ReLU-like features with a few exact zeros."""
    return (torch.randn(n, DIM, generator=gen) + 0.8).clamp_min(0) * torch.linspace(0.5, 2, DIM)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Linear, Outputs, Outputs]:
    gen = torch.Generator().manual_seed(17)
    head = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLASSES, DIM, generator=gen) / DIM**0.5)
        head.bias.copy_(torch.randn(CLASSES, generator=gen))

    def outputs(n: int) -> Outputs:
        feats = _features(n, gen)
        with torch.no_grad():
            logits = head(feats)
        return Outputs(feats, logits, logits.argmax(1))

    return head, outputs(N_TRAIN), outputs(N_TEST)


def _params(head: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return head.weight.detach().double().numpy(), head.bias.detach().double().numpy()


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(1)
    return top + np.log(np.exp(z - top[:, None]).sum(1))


def _energy(feats: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return _logsumexp(feats @ weight.T + bias)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ref_mahalanobis(train: Outputs, test: Outputs) -> np.ndarray:
    x, y = train.features.double().numpy(), train.labels.numpy()
    means = {c: x[y == c].mean(0) for c in np.unique(y)}
    centred = np.concatenate([x[y == c] - m for c, m in means.items()])
    precision = np.linalg.pinv(centred.T @ centred / len(x), hermitian=True)
    q = test.features.double().numpy()
    dists = [np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in means.values()]
    return -np.min(dists, axis=0)


def ref_knn(train: Outputs, test: Outputs, k: int = 50) -> np.ndarray:
    bank, q = train.features.double().numpy(), test.features.double().numpy()
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    # |q - b| of unit vectors, in float64 (a difference tensor would take 230 MB here).
    dists = np.sqrt(np.maximum(2 - 2 * q @ bank.T, 0))
    return -np.sort(dists, axis=1)[:, k - 1]


def ref_vim(train: Outputs, test: Outputs, head: nn.Linear) -> np.ndarray:
    weight, bias = _params(head)
    dim = DIM // 2
    origin = -np.linalg.pinv(weight) @ bias
    shifted = train.features.double().numpy() - origin
    _, eigvecs = np.linalg.eigh(shifted.T @ shifted / len(shifted))
    basis = eigvecs[:, : DIM - dim]

    def residual(o: Outputs) -> np.ndarray:
        return np.linalg.norm((o.features.double().numpy() - origin) @ basis, axis=1)

    alpha = train.logits.double().numpy().max(1).mean() / residual(train).mean()
    return _logsumexp(test.logits.double().numpy()) - alpha * residual(test)


def ref_react(train: Outputs, test: Outputs, head: nn.Linear, percentile: float) -> np.ndarray:
    values = np.sort(train.features.double().numpy().ravel())
    pos = percentile / 100 * (len(values) - 1)
    low = int(np.floor(pos))
    high = min(low + 1, len(values) - 1)
    threshold = values[low] + (pos - low) * (values[high] - values[low])
    return _energy(np.minimum(test.features.double().numpy(), threshold), *_params(head))


def ref_ash(test: Outputs, head: nn.Linear, binary: bool) -> np.ndarray:
    x = test.features.double().numpy()
    k = max(1, DIM - round(DIM * 0.9))
    shaped = np.zeros_like(x)
    for i, row in enumerate(x):
        kept = np.argsort(-row, kind="stable")[:k]
        total, kept_sum = row.sum(), row[kept].sum()
        if binary:
            shaped[i, kept] = total / k
        else:
            shaped[i, kept] = row[kept] * np.exp(total / kept_sum if kept_sum else 0.0)
    return _energy(shaped, *_params(head))


def ref_dice(train: Outputs, test: Outputs, head: nn.Linear) -> np.ndarray:
    weight, bias = _params(head)
    contribution = weight * train.features.double().numpy().mean(0)
    mask = contribution > np.percentile(contribution, 90)
    return _energy(test.features.double().numpy(), weight * mask, bias)


def ref_logit_scores(test: Outputs) -> dict[str, np.ndarray]:
    z = test.logits.double().numpy()
    p = _softmax(z)
    top = -np.sort(-p, axis=1)
    return {
        "msp": p.max(1),
        "maxlogit": z.max(1),
        "energy": _logsumexp(z),
        "gen": -(top**0.1 * (1 - top) ** 0.1).sum(1),
    }


@pytest.fixture(scope="module")
def references(setup) -> dict[str, np.ndarray]:
    head, train, test = setup
    return {
        **ref_logit_scores(test),
        "mahalanobis": ref_mahalanobis(train, test),
        "knn": ref_knn(train, test),
        "vim": ref_vim(train, test, head),
        "react": ref_react(train, test, head, 90.0),
        "ash_s": ref_ash(test, head, binary=False),
        "ash_b": ref_ash(test, head, binary=True),
        "dice": ref_dice(train, test, head),
    }


NAMES = [
    "msp", "maxlogit", "energy", "gen", "mahalanobis", "knn", "vim", "react", "ash_s", "ash_b",
    "dice",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_scores_equal_float64_reference(name, setup, references) -> None:
    head, train, test = setup
    scorer = make_scorer(name)
    if scorer.requires_fit:
        scorer.fit(train, head)
    got = scorer.score(test, head).double().numpy()
    np.testing.assert_allclose(got, references[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("percentile", [0.0, 37.5, 90.0, 99.99])
def test_react_threshold_equals_full_sort(percentile, setup) -> None:
    """The clip is the interpolated percentile of every training activation, ties included."""
    head, train, test = setup
    got = make_scorer("react", percentile=percentile).fit(train, head).score(test, head)
    want = ref_react(train, test, head, percentile)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)


class _Linear(Classifier):
    """Features are the normalised pixels, so ODIN's gradient has a closed form to check."""

    def __init__(self, head: nn.Linear):
        super().__init__((0.4,), (0.3,))
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_odin_equals_float64_reference(setup) -> None:
    head, _, _ = setup
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(64, 1, 4, 6, generator=gen)
    model = _Linear(head).eval()
    got = make_scorer("odin").score_batch(model, x).numpy()

    weight, bias = _params(head)
    t, eps = 1000.0, 0.0014
    pixels = x.double().flatten(1).numpy()
    z = ((pixels - 0.4) / 0.3) @ weight.T + bias
    p = _softmax(z / t)
    top = z.argmax(1)
    # d/dx log softmax(z / T)[top] = (W[top] - p @ W) / (0.3 T): its sign is the step.
    grad = (weight[top] - p @ weight) / (0.3 * t)
    moved = ((pixels + eps * np.sign(grad) - 0.4) / 0.3) @ weight.T + bias
    np.testing.assert_allclose(got, _softmax(moved / t).max(1), rtol=1e-6, atol=0)
