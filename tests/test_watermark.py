"""Watermarking: the losses, the sharpness-aware signed step, the wrapper, the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import finetune_argv, watermark_argv
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.method.watermark import (
    energy_watermark_loss,
    msp_watermark_loss,
    sharpness_aware_step,
)
from unleash_ood.models import create_model
from unleash_ood.models.watermark import Watermarked
from unleash_ood.specs import WatermarkSpec, watermark_preset


def test_msp_loss_by_hand() -> None:
    id_logits = torch.tensor([[2.0, 0.0]])
    noise = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    ce = math.log(1 + math.exp(-2))
    oe = (math.log(2) + (math.log(math.e + 1) - 0.5)) / 2
    loss = msp_watermark_loss(id_logits, torch.tensor([0]), noise, beta=3.5)
    assert loss.item() == pytest.approx(ce + 3.5 * oe)


def test_energy_loss_by_hand() -> None:
    id_logits = torch.tensor([[2.0, 0.0]])
    noise = torch.tensor([[1.0, -1.0]])
    ce = math.log(1 + math.exp(-2))
    e_out = (math.exp(0.7) + math.exp(-0.7)) / 2
    e_in = (math.exp(-0.4) + 1) / 2
    loss = energy_watermark_loss(id_logits, torch.tensor([0]), noise, 0.1, 0.2, 0.7)
    assert loss.item() == pytest.approx(ce + 0.1 * (e_out + e_in))


def test_sharpness_aware_step_by_hand() -> None:
    # L(w) = sum(a * w^2): grad 2 a w; e = g / |g|; the step signs the gradient at w + rho e
    a = torch.tensor([1.0, -3.0])
    w = torch.tensor([1.0, 0.1])

    def loss_fn(v):
        return (a * v**2).sum()

    g = 2 * a * w
    perturbed = w + 0.5 * g / g.norm()
    expected = w - 0.01 * torch.sign(2 * a * perturbed)
    new, loss = sharpness_aware_step(loss_fn, w, alpha=0.01, rho=0.5)
    assert torch.allclose(new, expected)
    assert loss == pytest.approx(float((a * perturbed**2).sum()))
    # rho = 0 is the plain signed gradient step; a zero gradient leaves w where it is
    new, _ = sharpness_aware_step(loss_fn, w, alpha=0.01, rho=0.0)
    assert torch.allclose(new, w - 0.01 * torch.sign(g))
    zero = torch.zeros(2)
    assert torch.equal(sharpness_aware_step(loss_fn, zero, 0.01, 0.5)[0], zero)


def test_watermarked_adds_the_pattern_before_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_channels=1, width=4).eval()
    pattern = torch.randn(1, 28, 28) * 0.1
    marked = Watermarked(model, pattern).eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(marked(x), model(x + pattern))
    assert torch.allclose(marked.features(x), model.features(x + pattern))
    assert marked.head is model.head and marked.num_classes == 10
    assert set(marked.state_dict()) == {"pattern"} | {f"model.{k}" for k in model.state_dict()}
    with pytest.raises(ValueError, match="channel"):
        Watermarked(model, torch.zeros(3, 28, 28))


def test_spec_fills_the_scores_defaults_and_checks_values() -> None:
    spec = WatermarkSpec(score="energy")
    assert (spec.sigma, spec.rho, spec.beta, spec.t_in, spec.t_out) == (1.5, 0.05, 0.1, 0.2, 0.7)
    assert WatermarkSpec(score="msp", beta=1.0).beta == 1.0
    with pytest.raises(UserError, match="--score"):
        WatermarkSpec(score="odin")
    with pytest.raises(UserError, match="--sigma"):
        WatermarkSpec(sigma=-1.0)
    with pytest.raises(UserError, match="--preset"):
        WatermarkSpec(preset="imagenet")


def test_cifar100_takes_the_authors_cifar100_settings() -> None:
    # QizhouWang/watermarking, train.py: the CIFAR-100 branches of both scores
    spec = WatermarkSpec(score="energy", preset=watermark_preset("cifar100"))
    assert (spec.sigma, spec.rho, spec.beta, spec.t_in, spec.t_out) == (0.4, 0.1, 0.1, 0.9, 0.1)
    spec = WatermarkSpec(score="msp", preset=watermark_preset("cifar100"), rho=0.5)
    assert (spec.sigma, spec.rho, spec.beta) == (1.0, 0.5, 2.5)
    assert watermark_preset("fmnist") == watermark_preset("cifar10") == "cifar10"


def _argv(fmnist_dir, ckpt, out, *extra) -> list[str]:
    return watermark_argv(fmnist_dir, ckpt, out, "--epochs", "2", *extra)


@pytest.mark.parametrize("score", ["msp", "energy"])
def test_watermark_command_writes_a_loadable_model(
    capsys, fmnist_dir, tiny_checkpoint, tmp_path, score
) -> None:
    out = tmp_path / score
    assert main(_argv(fmnist_dir, tiny_checkpoint, out, "--score", score)) == 0
    assert "watermarked model" in capsys.readouterr().out
    pattern = load_file(str(out / "watermark.safetensors"))["pattern"]
    assert pattern.shape == (1, 28, 28) and pattern.abs().max() > 0
    assert (out / "watermark.png").stat().st_size > 0
    spec = json.loads((out / "config.json").read_text())["spec"]
    assert (spec["score"], spec["preset"]) == (score, "cifar10")  # fmnist takes CIFAR-10's
    assert spec["sigma"] == WatermarkSpec(score=score).sigma
    assert (out / "log.txt").read_text().count("epoch") == 2
    marked, meta = load_checkpoint(out / "checkpoints" / "final")
    assert isinstance(marked, Watermarked) and meta["watermark"]["score"] == score
    assert torch.equal(marked.pattern[0], pattern)
    start, _ = load_checkpoint(tiny_checkpoint)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(marked(x), start(x + pattern), atol=1e-6)
    # the watermarked model evaluates like any checkpoint, with every kind of scorer
    ev = tmp_path / f"ev-{score}"
    argv = [
        "evaluate",
        "--checkpoint",
        str(out / "checkpoints" / "final"),
        "--scores",
        "msp,energy,knn,odin",
        "--data-dir",
        str(fmnist_dir),
        "--out",
        str(ev),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert (ev / "metrics.json").exists()


def test_watermark_is_seeded(fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    for name in ("a", "b"):
        assert main(_argv(fmnist_dir, tiny_checkpoint, tmp_path / name, "--epochs", "1")) == 0
    a, b = (load_file(str(tmp_path / n / "watermark.safetensors"))["pattern"] for n in "ab")
    assert torch.equal(a, b)


def test_bad_watermark_input_is_a_one_line_error(capsys, fmnist_dir, tiny_checkpoint, tmp_path):
    cases = [
        (_argv(fmnist_dir, tmp_path / "missing", tmp_path / "a"), "no checkpoint"),
        (_argv(fmnist_dir, tiny_checkpoint, tmp_path / "b", "--rho", "nan"), "--rho"),
        (_argv(fmnist_dir, tiny_checkpoint, tmp_path / "c", "--batch-size", "5000"), "batch"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not any((tmp_path / n).exists() for n in "abc")
    # a finished run is never overwritten; a watermarked model is not watermarked again
    out = tmp_path / "done"
    assert main(_argv(fmnist_dir, tiny_checkpoint, out, "--epochs", "1")) == 0
    assert main(_argv(fmnist_dir, tiny_checkpoint, out, "--epochs", "1")) == 2
    assert "already holds results" in capsys.readouterr().err
    again = _argv(fmnist_dir, out / "checkpoints" / "final", tmp_path / "again", "--epochs", "1")
    assert main(again) == 2
    assert "already a watermarked" in capsys.readouterr().err
    finetune = finetune_argv(fmnist_dir, out / "checkpoints" / "final", tmp_path / "ft")
    assert main(finetune) == 2
    assert "is a watermarked model" in capsys.readouterr().err
