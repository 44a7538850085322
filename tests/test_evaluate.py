import numpy as np
import pytest
import torch

from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.errors import UserError
from unleash_ood.evaluate import Evaluator, evaluate, forward_outputs
from unleash_ood.metrics import ood_metrics
from unleash_ood.scores import make_scorer


class CountingModel(torch.nn.Module):
    """Wraps a classifier and counts the images its trunk sees."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.head = model.head
        self.seen = 0

    def features(self, x):
        self.seen += x.shape[0]
        return self.inner.features(x)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]


def test_one_forward_pass_per_dataset(model, tiny_benchmark) -> None:
    b = tiny_benchmark
    counting = CountingModel(model)
    scorers = [
        make_scorer(n)
        for n in (
            "msp",
            "energy",
            "maxlogit",
            "knn",
            "mahalanobis",
            "react",
            "ash_s",
            "dice",
            "vim",
            "gen",
        )
    ]
    evaluate(counting, b, scorers, splits=("val", "test"), device="cpu", progress=False)
    n_total = (
        len(b.id_train)
        + len(b.id_val)
        + len(b.id_test)
        + sum(map(len, b.ood_test.values()))
        + sum(map(len, b.ood_val.values()))
    )
    assert counting.seen == n_total


def test_metrics_match_direct_computation(model, tiny_benchmark) -> None:
    b = tiny_benchmark
    ev = evaluate(model, b, "energy", device="cpu", progress=False)
    energy = lambda data: torch.logsumexp(  # noqa: E731
        forward_outputs(model, data).logits.double(), 1
    ).numpy()
    id_scores = energy(b.id_test)
    per_set = {n: ood_metrics(id_scores, energy(d)) for n, d in b.ood_test.items()}
    for name, want in per_set.items():
        assert ev.row("energy", name)["auroc"] == pytest.approx(want["auroc"], abs=1e-9)
    headline = [n for n in per_set if n not in b.excluded_from_mean]
    assert "noise" not in headline
    assert ev.row("energy")["fpr95_id"] == pytest.approx(
        np.mean([per_set[n]["fpr95_id"] for n in headline])
    )
    logits = forward_outputs(model, b.id_test).logits
    want_acc = float((logits.argmax(1) == b.id_test.labels).double().mean())
    assert ev.accuracy["id_test"] == pytest.approx(want_acc)


def test_gradient_scorer_runs_through_model(model, tiny_benchmark) -> None:
    """ODIN through the evaluator equals the paper's recipe computed by hand on the ID test
    images: a signed-gradient step of size eps on the input that raises the max softmax at
    temperature T, then the max softmax at T of the perturbed input."""
    ev = evaluate(model, tiny_benchmark, "odin", device="cpu", progress=False)
    t, eps = 1000.0, 0.0014
    x, _ = tiny_benchmark.id_test.__getitems__(range(len(tiny_benchmark.id_test)))
    x.requires_grad_(True)
    log_probs = torch.log_softmax(model(x) / t, dim=1)
    (grad,) = torch.autograd.grad(log_probs.max(dim=1).values.sum(), x)
    with torch.no_grad():
        want = torch.softmax(model(x + eps * grad.sign()).double() / t, dim=1).max(dim=1).values
    got = torch.as_tensor(ev.scores["test"]["odin"]["id"])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    assert 0.0 <= ev.row("odin")["auroc"] <= 1.0


def test_output_cache_skips_forward_passes(model, tiny_benchmark, tmp_path) -> None:
    first = evaluate(
        model, tiny_benchmark, "energy", device="cpu", progress=False, cache_dir=tmp_path
    )
    counting = CountingModel(model)
    again = Evaluator(
        counting, tiny_benchmark, "energy", device="cpu", progress=False, cache_dir=tmp_path
    )
    again.cache.dir = next(tmp_path.iterdir())  # the fingerprint of the wrapped model differs
    second = again.run()
    assert counting.seen == 0
    assert first.rows == second.rows


def test_nan_logits_are_refused(model, tiny_benchmark) -> None:
    broken = CountingModel(model)
    broken.head = torch.nn.Linear(model.feature_dim, 10)
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN or infinite logits"):
        evaluate(broken, tiny_benchmark, "msp", device="cpu", progress=False)


def test_unknown_split_refused(model, tiny_benchmark) -> None:
    with pytest.raises(UserError, match="unknown split"):
        evaluate(model, tiny_benchmark, "msp", splits=("train",), device="cpu", progress=False)


def test_forward_outputs_fill_whole_dataset_buffers(model, tiny_benchmark) -> None:
    data = tiny_benchmark.id_test
    out = forward_outputs(model, data, batch_size=97)  # the last batch is partial
    x, labels = data.__getitems__(range(len(data)))
    with torch.no_grad():
        feats = model.eval().features(x)
    assert out.features.dtype == out.logits.dtype == torch.float32
    assert torch.allclose(out.features, feats, atol=1e-5)
    assert torch.allclose(out.logits, model.head(feats), atol=1e-5)
    assert torch.equal(out.labels, labels) and out.labels.data_ptr() != data.labels.data_ptr()
