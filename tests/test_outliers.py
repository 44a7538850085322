"""Outlier exposure: the losses, POEM's posterior sampling, DOE's perturbation, the command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TORCHRUN, finetune_argv, interrupted_and_resumed
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.data.base import ImageSet
from unleash_ood.method.constraint import um_loss
from unleash_ood.method.doe import Perturbation, frozen_bn_stats, surrogate_direction
from unleash_ood.method.finetune import FinetuneSpec, finetune_recipe
from unleash_ood.method.outliers import (
    OUTLIER_METHODS,
    OutlierObjective,
    OutlierSpec,
    energy_margin_loss,
    oe_loss,
)
from unleash_ood.method.poem import PoemSelector, posterior, thompson_sample
from unleash_ood.models import create_model
from unleash_ood.outputs import forward_outputs


def test_oe_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    expected = (math.log(3) + math.log(math.e + 2) - 1 / 3) / 2
    assert oe_loss(logits).item() == pytest.approx(expected)


def test_oe_gradient_pulls_outliers_towards_uniform() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    oe_loss(logits).backward()
    expected = torch.softmax(logits.detach(), 1) - 1 / 3
    torch.testing.assert_close(logits.grad, expected)
    assert logits.grad[0, 0] > 0 > logits.grad[0, 2]  # descent lowers the top logit


def test_energy_margin_loss_by_hand() -> None:
    # E = -logsumexp: -log 2 for (0, 0); -(1 + log 2) for (1, 1).
    id_logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    out_logits = torch.tensor([[0.0, 0.0]])
    got = energy_margin_loss(id_logits, out_logits, m_in=-1.5, m_out=0.0)
    e_in = [-math.log(2), -(1 + math.log(2))]
    expected = np.mean([max(e + 1.5, 0) ** 2 for e in e_in]) + math.log(2) ** 2
    assert got.item() == pytest.approx(expected)
    assert energy_margin_loss(id_logits, out_logits, m_in=0.0, m_out=-5.0).item() == 0.0


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def small_sets(n_id: int = 8, n_aux: int = 6) -> tuple[torch.Tensor, torch.Tensor, ImageSet]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_id, 1, 4, 4, generator=g)
    y = torch.arange(n_id) % 3
    aux = ImageSet("aux", torch.randint(0, 256, (n_aux, 1, 4, 4), dtype=torch.uint8, generator=g))
    return x, y, aux


@pytest.mark.parametrize("method", ["oe", "energy"])
@pytest.mark.parametrize("xi", [None, 5.0])
def test_objective_constrains_only_the_id_term(method: str, xi: float | None) -> None:
    model = linear_model()
    x, y, aux = small_sets()
    margins = {"m_in": -1.0, "m_out": 1.0} if method == "energy" else {}
    spec = OutlierSpec(method=method, aux_ratio=len(aux) / len(x), **margins)
    objective = OutlierObjective(spec, aux, xi, len(x), 1, "none", 0)
    objective.start_epoch(0, model)
    loss, logits = objective(model, x, y)
    # One step draws every outlier once, and both outlier terms are means: order is irrelevant.
    out_logits = model(aux.images.float() / 255)
    ce = F.cross_entropy(model(x), y)
    id_term = ce if xi is None else um_loss(ce, xi)
    aux_term = (
        oe_loss(out_logits)
        if method == "oe"
        else energy_margin_loss(model(x), out_logits, spec.m_in, spec.m_out)
    )
    assert loss.item() == pytest.approx((id_term + spec.lam * aux_term).item(), rel=1e-5)
    torch.testing.assert_close(logits, model(x))
    if xi is not None:  # CE < xi: the ID gradient is ascent, the outlier gradient is unchanged
        model.zero_grad()
        loss.backward()
        with_um = model[1].weight.grad.clone()
        model.zero_grad()
        (-ce + spec.lam * aux_term).backward()
        torch.testing.assert_close(with_um, model[1].weight.grad)


def test_outlier_batches_cycle_through_a_seeded_permutation() -> None:
    _, _, aux = small_sets(n_aux=10)
    objective = OutlierObjective(OutlierSpec(aux_ratio=0.5), aux, None, 8, 1, "none", 3)
    objective.start_epoch(0, linear_model())
    seen = torch.cat([objective.stream.next(torch.device("cpu")) for _ in range(5)])
    assert seen.shape == (20, 1, 4, 4)
    first, second = seen[:10].flatten(1), seen[10:].flatten(1)
    assert {tuple(r.tolist()) for r in first} == {tuple(r.tolist()) for r in second}


def test_aux_batch_is_an_integer() -> None:
    assert OutlierSpec(aux_ratio=1.0).aux_batch(256) == 256
    assert isinstance(OutlierSpec(aux_ratio=1.5).aux_batch(255), int)


def test_posterior_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 4, generator=g)
    y = torch.sign(torch.randn(50, generator=g)) * 3
    mean, chol = posterior(z, y, prior_var=20.0, noise_var=0.5)
    zn, yn = z.double().numpy(), y.double().numpy()
    precision = zn.T @ zn / 0.5 + np.eye(4) / 20.0
    np.testing.assert_allclose(mean.numpy(), np.linalg.solve(precision, zn.T @ yn / 0.5))
    np.testing.assert_allclose((chol @ chol.T).numpy(), precision, rtol=1e-10)


def test_thompson_samples_have_the_posterior_covariance() -> None:
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    precision = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    chol = torch.linalg.cholesky(precision)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([thompson_sample(mean, chol, g) for _ in range(20_000)])
    torch.testing.assert_close(draws.mean(0), mean, atol=0.02, rtol=0)
    cov = torch.cov(draws.T)
    torch.testing.assert_close(cov, torch.linalg.inv(precision), atol=0.01, rtol=0)


def test_poem_keeps_the_outliers_nearest_the_sampled_boundary(tiny_benchmark) -> None:
    model = create_model("cnn", num_classes=10, in_channels=1, width=4).eval()
    g = torch.Generator().manual_seed(0)
    aux = ImageSet("aux", torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=g))
    selector = PoemSelector(keep=0.25, seed=0)
    chosen = selector.select(model, aux, tiny_benchmark.id_train, epoch=0)
    assert len(chosen) == 50 and torch.equal(chosen, chosen.unique())
    # the kept outliers are the 50 nearest the sampled boundary |beta . z|
    distance = (forward_outputs(model, aux).features.double() @ selector.boundary).abs()
    kept = torch.zeros(len(aux), dtype=torch.bool)
    kept[chosen] = True
    assert distance[kept].max() <= distance[~kept].min()
    again = PoemSelector(keep=0.25, seed=0).select(model, aux, tiny_benchmark.id_train, 0)
    assert torch.equal(chosen, again)
    # Refit with the selected outliers in the buffer: the next epoch's choice is its own.
    later = selector.select(model, aux, tiny_benchmark.id_train, epoch=1)
    assert len(selector.history) == 2 and len(later) == 50


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)
    )


def test_doe_direction_is_rescaled_per_layer_and_leaves_bn_stats_alone() -> None:
    model = bn_model().train()
    x, _, aux = small_sets()
    batch = torch.cat([x, aux.images.float() / 255])
    stats = model[1].running_mean.clone()
    weights = [model[0].weight, model[4].weight]
    direction = surrogate_direction(model, weights, batch, len(x))
    assert torch.equal(model[1].running_mean, stats)
    for w, d in zip(weights, direction, strict=True):
        assert d.norm().item() == pytest.approx(w.norm().item(), rel=1e-5)

    # The direction descends the surrogate (dL_OE/ds)^2.
    def surrogate(ws):
        with frozen_bn_stats(model), torch.no_grad():
            saved = [w.clone() for w in weights]
            for w, new in zip(weights, ws, strict=True):
                w.copy_(new)
            scale = torch.ones((), requires_grad=True)
            with torch.enable_grad():
                loss = oe_loss((model(batch) * scale)[len(x) :])
                (d,) = torch.autograd.grad(loss, scale)
            for w, old in zip(weights, saved, strict=True):
                w.copy_(old)
        return d.pow(2).item()

    before = surrogate(weights)
    after = surrogate([w + 1e-3 * d for w, d in zip(weights, direction, strict=True)])
    assert after < before


def test_doe_perturbation_is_undone_exactly() -> None:
    model = bn_model().train()
    x, _, aux = small_sets()
    batch = torch.cat([x, aux.images.float() / 255])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = Perturbation(model)
    p.update(batch, len(x), torch.Generator().manual_seed(0))
    with p.applied():
        assert not torch.equal(model[0].weight, before["0.weight"])
        model(batch)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_doe_step_accumulates_the_perturbed_outlier_gradient() -> None:
    model = bn_model().train()
    x, y, aux = small_sets()
    spec = OutlierSpec(method="doe", aux_ratio=len(aux) / len(x), doe_warmup=0.0)
    objective = OutlierObjective(spec, aux, None, len(x), 1, "none", 0)
    objective.start_epoch(0, model)
    assert objective.doe_active
    loss, _ = objective(model, x, y)
    outlier_grad = model[4].weight.grad.clone()
    assert outlier_grad.abs().sum() > 0
    loss.backward()
    assert not torch.equal(model[4].weight.grad, outlier_grad)


def _finetune_args(fmnist_dir, ckpt, out, *extra) -> list[str]:
    return finetune_argv(fmnist_dir, ckpt, out, "--epochs", "2", "--aux-size", "600", *extra)


@pytest.mark.parametrize(
    ("outliers", "method"),
    [("oe", "ce"), ("energy", "um"), ("poem", "ce"), ("doe", "um"), ("oe", "umap")],
)
def test_finetune_with_outliers(
    capsys, fmnist_dir, tiny_checkpoint, tmp_path, outliers, method
) -> None:
    out = tmp_path / f"{outliers}-{method}"
    args = ["--outliers", outliers, "--method", method, "--n-masks", "2"]
    code = main(_finetune_args(fmnist_dir, tiny_checkpoint, out, *args))
    assert code == 0, capsys.readouterr().err
    assert f"{outliers} outlier exposure" in capsys.readouterr().out
    final, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["finetune"]["outliers"]["method"] == outliers
    assert meta["finetune"]["method"] == method
    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["outliers"]["aux"] == "bundled"
    start, _ = load_checkpoint(tiny_checkpoint)
    assert not torch.equal(final.head.weight, start.head.weight)


def test_finetune_reads_an_npy_aux_file(capsys, fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "aux.npy", rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "npy"
    args = ["--outliers", "oe", "--method", "ce", "--aux", str(tmp_path / "aux.npy")]
    assert main(_finetune_args(fmnist_dir, tiny_checkpoint, out, *args)) == 0
    assert (out / "checkpoints" / "final.safetensors").exists()


def test_bad_outlier_flags_are_one_line_errors(capsys, fmnist_dir, tiny_checkpoint, tmp_path):
    args = ["--outliers", "oe", "--method", "ce", "--aux", str(tmp_path / "none.npy")]
    assert main(_finetune_args(fmnist_dir, tiny_checkpoint, tmp_path / "a", *args)) == 2
    assert "no such file or folder" in capsys.readouterr().err
    args = ["--outliers", "oe", "--method", "ce", "--aux-ratio", "0"]
    assert main(_finetune_args(fmnist_dir, tiny_checkpoint, tmp_path / "b", *args)) == 2
    assert "--aux-ratio must be a finite number > 0" in capsys.readouterr().err
    # a source that exists but cannot be read is refused before xi is estimated, for UM too
    (tmp_path / "outliers.json").write_text("{}")
    for flags in (["--aux", "oe"], ["--wild", "woods"]):
        source, method = flags
        args = ["--outliers", method, "--method", "um", source, str(tmp_path / "outliers.json")]
        assert main(_finetune_args(fmnist_dir, tiny_checkpoint, tmp_path / "c", *args)) == 2
        assert "unknown outlier file type '.json'" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()


# DOE perturbs from the first epoch (its default waits half of them); POEM has no warm-up.
DOE_AT_ONCE = {"poem": {}, "doe": {"doe_warmup": 0.0}}


@pytest.mark.parametrize("outliers", ["poem", "doe"])
def test_resume_restores_the_objectives_state(
    tiny_benchmark, tiny_checkpoint, tmp_path: Path, outliers: str
) -> None:
    spec = FinetuneSpec(
        method="ce", outliers=OutlierSpec(method=outliers, aux_size=400, **DOE_AT_ONCE[outliers])
    )
    recipe = finetune_recipe("ce", epochs=2, batch_size=128)
    a, b = interrupted_and_resumed(tiny_benchmark, tiny_checkpoint, spec, recipe, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_doe_under_torchrun_agrees_with_one_process(fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    """DOE's perturbation direction is averaged over processes, as one process would take it
    from the whole batch; the runs differ by BatchNorm normalising each half-batch alone."""
    extra = ["--method", "ce", "--outliers", "doe", "--doe-warmup", "0", "--aux-size", "600"]
    args = finetune_argv(fmnist_dir, tiny_checkpoint, tmp_path / "single", *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, "-m", "unleash_ood", *args], check=True, env=env, timeout=300)
    torchrun = [*TORCHRUN, "-m", "unleash_ood"]
    ddp = [*args, "--out", str(tmp_path / "ddp")]  # the last --out wins
    subprocess.run([*torchrun, *ddp], check=True, env=env, timeout=300)
    a, _ = load_checkpoint(tmp_path / "single" / "checkpoints" / "final")
    b, _ = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "final")
    w_a, w_b = a.head.weight, b.head.weight
    assert (w_a - w_b).norm() / w_a.norm() < 0.1


def test_every_outlier_method_is_one_registered_class() -> None:
    from unleash_ood.method import OUTLIER_OBJECTIVES

    assert set(OUTLIER_OBJECTIVES) == set(OUTLIER_METHODS)
    assert all(issubclass(cls, OutlierObjective) for cls in OUTLIER_OBJECTIVES.values())
    _, _, aux = small_sets()
    for method in ("oe", "energy", "doe"):  # the earlier constructor builds the method's class
        objective = OutlierObjective(OutlierSpec(method=method), aux, None, 4, 1, "none", 0)
        assert type(objective) is OUTLIER_OBJECTIVES[method]
