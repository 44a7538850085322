"""The EKFAC score test: the Kronecker factors' inputs and output gradients against autograd,
the statistic by hand, and the whole fit and score against a plain per-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unleash_ood.errors import UserError
from unleash_ood.generative import create_detector, parse_detector_scores
from unleash_ood.generative.score_test import per_sample_gradients
from unleash_ood.generative.score_test_ekfac import (
    ScoreTestEKFAC,
    ekfac_statistic,
    layer_inputs,
    output_gradients,
    select_layers,
    weight_gradients,
)

TINY_VAE = {"width": 2, "latent": 3, "lossy": "none"}


def tiny_vae() -> torch.nn.Module:
    """A tiny plain VAE with PyTorch's default initialisation: the authors' N(0, 0.02) weights
    leave an untrained model's posterior near constant, so most eigen-directions carry no
    gradient and the statistic barely varies."""
    torch.manual_seed(0)
    model = create_detector("vae", 1, 28, **TINY_VAE)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            m.reset_parameters()
    return model.eval()


def test_select_layers_takes_names_and_everything_under_them() -> None:
    model = tiny_vae()
    assert list(select_layers(model, "encoder+to_mu")) == [
        *("encoder.0", "encoder.2", "encoder.4", "encoder.6", "encoder.8", "to_mu")
    ]
    assert list(select_layers(model, " to_logvar + encoder.2 ")) == ["encoder.2", "to_logvar"]
    with pytest.raises(UserError, match="no convolution or linear layer at 'head'"):
        select_layers(model, "to_mu+head")
    with pytest.raises(UserError, match=r"no convolution or linear layer at 'decoder\.1'"):
        select_layers(model, "decoder.1")  # a transposed convolution


def test_each_images_weight_gradient_is_its_output_gradients_times_its_inputs() -> None:
    """K-FAC's premise: for every layer, ``G_i = sum_p g_ip a_ip^T`` with the unfolded
    patches (and a 1 for the bias) of ``layer_inputs`` and the position-wise gradients of
    ``output_gradients``; so ``A`` and ``B`` describe the same gradients the score rotates."""
    model = tiny_vae()
    layers = select_layers(model, "encoder+to_mu+to_logvar")
    x = torch.rand(5, 1, 28, 28)
    inputs, outputs = {}, {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, o, n=name: inputs.__setitem__(n, a[0]) or outputs.__setitem__(n, o)
        )
        for name, layer in layers.items()
    ]
    grads = torch.autograd.grad(model(x).sum(), [outputs[n] for n in layers])
    for h in handles:
        h.remove()
    names = [f"{n}.{p}" for n in layers for p in ("weight", "bias")]
    per_sample = per_sample_gradients(model, x, names)
    for (name, layer), g in zip(layers.items(), grads, strict=True):
        product = torch.einsum(
            "npo,npi->noi", output_gradients(g), layer_inputs(layer, inputs[name])
        )
        expected = weight_gradients(name, layer, per_sample)
        assert torch.allclose(product, expected, rtol=1e-4, atol=1e-6), name


def test_ekfac_statistic_by_hand() -> None:
    t = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    s = torch.tensor([[1.0, 4.0], [9.0, 16.0]], dtype=torch.float64)
    assert ekfac_statistic(t, s).tolist() == pytest.approx([4.0, 4.0 + 1 / 16], rel=1e-7)


NAMES = ("encoder.6", "to_mu")


def per_image(model, x: torch.Tensor) -> list[dict[str, tuple[np.ndarray, ...]]]:
    """For each image, one backward pass: per layer of ``NAMES`` its inputs (unfolded, with a
    1 for the bias), its output gradients and its weight gradient with the bias appended."""
    modules = dict(model.named_modules())
    kept = {}
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: kept.__setitem__(n, (a[0], o)))
        for n in NAMES
    ]
    out = []
    for xi in x:
        model.zero_grad()
        loss = model(xi[None]).sum()
        gouts = torch.autograd.grad(loss, [kept[n][1] for n in NAMES], retain_graph=True)
        loss.backward()
        row = {}
        for n, gout in zip(NAMES, gouts, strict=True):
            a = kept[n][0].detach()
            if n == "encoder.6":
                a, g = F.unfold(a, 5, padding=2, stride=2)[0].T, gout[0].flatten(1).T
            else:
                g = gout
            a = torch.cat([a, torch.ones(len(a), 1)], 1)
            w, b = modules[n].weight.grad, modules[n].bias.grad
            grad = torch.cat([w.flatten(1), b[:, None]], 1)
            row[n] = tuple(t.double().numpy() for t in (a, g, grad))
        out.append(row)
    for h in handles:
        h.remove()
    return out


def test_fit_and_score_match_a_per_image_reference(tiny_benchmark) -> None:
    """The reference follows the authors' procedure one image at a time in NumPy. The
    eigenvectors are compared through the factors they must diagonalise (near-equal eigenvalues
    make the vectors themselves unstable to rounding); the rest uses the fitted ones."""
    model = tiny_vae()
    score = ScoreTestEKFAC(layers="+".join(NAMES), samples=40, batch_size=16)
    score.fit(model, tiny_benchmark.id_train, torch.device("cpu"))
    train_x, _ = tiny_benchmark.id_train.__getitems__(range(40))
    test_x, _ = tiny_benchmark.id_test.__getitems__(range(6))
    train, test = per_image(model, train_x), per_image(model, test_x)
    standardised = []
    for n in NAMES:
        u_a, u_b = (u.numpy() for u in score.bases_[n])
        for factor, u in (
            (sum(r[n][0].T @ r[n][0] for r in train), u_a),
            (sum(r[n][1].T @ r[n][1] for r in train), u_b),
        ):
            rotated = u.T @ factor @ u
            off_diagonal = rotated - np.diag(np.diag(rotated))
            assert np.abs(off_diagonal).max() < 1e-5 * np.abs(factor).max(), n
        s = np.mean([(u_b.T @ r[n][2] @ u_a) ** 2 for r in train], 0)
        assert score.scale_[n].numpy() == pytest.approx(s, rel=1e-5, abs=1e-12)

        def stat(rows, u_a=u_a, u_b=u_b, s=s, n=n):
            return np.array([((u_b.T @ r[n][2] @ u_a) ** 2 / (s + 1e-8)).sum() for r in rows])

        base = stat(train)
        # The spread is small against the mean (0.08 against 21 on one layer), so float32
        # rounding of the statistics, which differs between CPUs' kernels, reaches the std
        # at the mean's scale; a wrong ddof (1.3 % of the std here) still fails.
        tolerance = 1e-5 * abs(base.mean())
        assert score.standard_[n] == pytest.approx((base.mean(), base.std()), abs=tolerance)
        standardised.append((stat(test) - base.mean()) / base.std())
    expected = -np.max(standardised, 0)
    got = score.score_batch(model, test_x).numpy()
    # float32 gradients of batched and one-image passes differ in the last bits, which the
    # directions of small S amplify
    assert got == pytest.approx(expected, rel=1e-3)


def test_score_test_ekfac_refuses_what_it_cannot_give() -> None:
    restoring = create_detector("vae", 1, 28, width=2, latent=3)  # lossy=downsample
    with pytest.raises(UserError, match="needs a plain VAE"):
        ScoreTestEKFAC().check(restoring)
    with pytest.raises(UserError, match="samples must be an integer >= 2"):
        ScoreTestEKFAC(samples=1).check(tiny_vae())
    with pytest.raises(UserError, match="must be fit"):
        ScoreTestEKFAC().score_batch(tiny_vae(), torch.rand(2, 1, 28, 28))
    parsed = parse_detector_scores("score_test_ekfac:layers=to_mu:samples=8", "vae")
    assert parsed[0].params() == {"layers": "to_mu", "samples": 8, "batch_size": 50}
