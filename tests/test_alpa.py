"""ALPA (MODE's attention-based local propagation): the similarity and the loss by hand, the
spec's checks, a fine-tune that `unleash evaluate --scores mode` reads, and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import finetune_argv, interrupted_and_resumed
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.method.alpa import (
    AlpaObjective,
    AttentionSimilarity,
    check_alpa_model,
    local_contrastive_loss,
)
from unleash_ood.method.finetune import FinetuneSpec, finetune_recipe
from unleash_ood.specs import OutlierSpec


def identity_attention(channels: int) -> AttentionSimilarity:
    """Projections that pass non-negative tokens through unchanged: q = k = v = t."""
    attention = AttentionSimilarity(channels, channels)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.eye(channels))
    return attention


def maps(*images: list[list[float]]) -> torch.Tensor:
    """``(N, D, 1, P)`` maps from each image's list of ``P`` tokens of ``D`` channels."""
    return torch.tensor(images, dtype=torch.float32).transpose(1, 2).unsqueeze(2)


def test_one_position_gives_twice_the_cosine_of_the_values() -> None:
    # one position: the attention weight is 1, so s_ij = 2 cos(v_i, v_j)
    s = identity_attention(2)(maps([[1, 0]], [[1, 1]], [[0, 1]]))
    r = math.sqrt(2)
    expected = torch.tensor([[2, r, 0], [r, 2, r], [0, r, 2]])
    assert torch.allclose(s, expected, atol=1e-6)


def test_two_positions_by_hand() -> None:
    # a = (e1, e1), b = (e1, e2); q = k = v = t and scores scaled by 1/sqrt(2)
    s = identity_attention(2)(maps([[1, 0], [1, 0]], [[1, 0], [0, 1]]))
    w = 1 / (1 + math.exp(-1 / math.sqrt(2)))  # softmax weight of the matching key
    near = w / math.hypot(w, 1 - w)  # cos(e_k, w e_k + (1 - w) e_other)
    # c_aa = 1 (a's keys are equal: aligned e1); c_ab = near; c_ba = (1 + 0) / 2; c_bb = near
    expected = torch.tensor([[2.0, near + 0.5], [near + 0.5, 2 * near]])
    assert torch.allclose(s, expected, atol=1e-6)


def test_similarity_is_symmetric_for_any_projection() -> None:
    attention = AttentionSimilarity(6, 4)
    attention.reset_parameters(torch.Generator().manual_seed(0))
    s = attention(torch.randn(5, 6, 3, 2, generator=torch.Generator().manual_seed(1)))
    assert s.shape == (5, 5) and torch.allclose(s, s.T, atol=1e-6)
    assert (s.abs() <= 2 + 1e-6).all()


def test_local_contrastive_loss_by_hand() -> None:
    s = torch.tensor([[0.0, 0.5, -0.2], [0.5, 0.0, 0.3], [-0.2, 0.3, 0.0]])
    labels = torch.tensor([0, 0, 1])
    t = 2.0
    # anchor 0: positive 1 among {1, 2}; anchor 1: positive 0 among {0, 2}; anchor 2: none (0)
    a0 = -(t * 0.5 - math.log(math.exp(t * 0.5) + math.exp(t * -0.2)))
    a1 = -(t * 0.5 - math.log(math.exp(t * 0.5) + math.exp(t * 0.3)))
    expected = (a0 + a1 + 0.0) / 3
    assert local_contrastive_loss(s, labels, t).item() == pytest.approx(expected, rel=1e-6)


def test_local_contrastive_loss_averages_over_every_positive() -> None:
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.4], [0.0, 0.4, 0.0]])
    labels = torch.tensor([3, 3, 3])
    log_norm = [math.log(math.exp(1) + 1), math.log(math.exp(1) + math.exp(0.4))]
    log_norm.append(math.log(1 + math.exp(0.4)))
    a0 = -((1 - log_norm[0]) + (0 - log_norm[0])) / 2
    a1 = -((1 - log_norm[1]) + (0.4 - log_norm[1])) / 2
    a2 = -((0 - log_norm[2]) + (0.4 - log_norm[2])) / 2
    got = local_contrastive_loss(s, labels, 1.0).item()
    assert got == pytest.approx((a0 + a1 + a2) / 3, rel=1e-6)


def test_objective_is_ce_plus_the_weighted_local_term(tiny_checkpoint) -> None:
    model, _ = load_checkpoint(tiny_checkpoint)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    objective = AlpaObjective(model.feature_dim, weight=0.5, temperature=10.0, dim=8, seed=3)
    loss, logits = objective(model.eval(), x, y)
    _, fmap = model.features_with_map(x)
    local = local_contrastive_loss(objective.attention(fmap), y, 10.0)
    ce = nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(logits, model(x)) and torch.allclose(loss, ce + 0.5 * local)
    loss.backward()
    assert all(p.grad is not None for _, p in objective.named_parameters())
    again = AlpaObjective(model.feature_dim, dim=8, seed=3).state_dict()
    assert all(torch.equal(again[k], v) for k, v in objective.state_dict().items())


def test_spec_checks_alpa_flags() -> None:
    with pytest.raises(UserError, match="belong to --method alpa"):
        FinetuneSpec(method="ce", alpa_weight=2.0)
    with pytest.raises(UserError, match="no --outliers"):
        FinetuneSpec(method="alpa", outliers=OutlierSpec(method="oe"))
    with pytest.raises(UserError, match="--alpa-temperature"):
        FinetuneSpec(method="alpa", alpa_temperature=0.0)
    with pytest.raises(UserError, match="--alpa-dim"):
        FinetuneSpec(method="alpa", alpa_dim=0)
    spec = FinetuneSpec(method="alpa")
    assert (spec.loss, spec.trains) == ("alpa", "weights")
    paper = finetune_recipe("alpa", "paper")
    assert (paper.epochs, paper.batch_size, paper.lr, paper.schedule) == (500, 128, 0.1, "cosine")
    assert finetune_recipe("um", "paper").epochs == 100


def test_models_without_a_map_are_refused() -> None:
    with pytest.raises(UserError, match="last feature map"):
        check_alpa_model(nn.Linear(3, 2))


def _argv(fmnist_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return finetune_argv(fmnist_dir, ckpt, out, "--batch-size", "64", "--alpa-dim", "8", *extra)


def test_alpa_finetune_then_mode(capsys, fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "alpa"
    code = main(_argv(fmnist_dir, tiny_checkpoint, out, "--loss", "alpa", "--trains", "weights"))
    assert code == 0, capsys.readouterr().err
    final, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["finetune"]["method"] == "alpa" and meta["finetune"]["xi"] is None
    assert set(final.state_dict()) == set(load_checkpoint(tiny_checkpoint)[0].state_dict())
    start, _ = load_checkpoint(tiny_checkpoint)
    assert not torch.equal(final.head.weight, start.head.weight)
    spec = json.loads((out / "config.json").read_text())["spec"]
    assert (spec["method"], spec["alpa_dim"], spec["alpa_weight"]) == ("alpa", 8, 1.0)
    state = load_file(str(next((out / "checkpoints").glob("train_state_*"))))
    assert "objective/alpa/attention.query.0.weight" in state
    assert "momentum/objective.attention.value.2.weight" in state
    ev = tmp_path / "ev"
    argv = ["evaluate", "--checkpoint", str(out / "checkpoints" / "final"), "--scores", "mode"]
    argv += ["--data-dir", str(fmnist_dir), "--out", str(ev), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads((ev / "metrics.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} == {"mode"} and all(0 <= r["auroc"] <= 1 for r in rows)


def test_resume_restores_the_projectors(tiny_benchmark, tiny_checkpoint, tmp_path) -> None:
    spec = FinetuneSpec(method="alpa", alpa_dim=8)
    recipe = finetune_recipe("alpa", "quick", epochs=2, batch_size=64)
    a, b = interrupted_and_resumed(tiny_benchmark, tiny_checkpoint, spec, recipe, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (
        load_file(str(next((tmp_path / n / "checkpoints").glob("train_state_*")))) for n in "ab"
    )
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_alpa_flags_are_one_line_errors(capsys, fmnist_dir, tiny_checkpoint, tmp_path):
    cases = [
        (["--method", "alpa", "--alpa-weight", "nan"], "--alpa-weight"),
        (["--method", "alpa", "--alpa-dim", "0"], "--alpa-dim"),
        (["--method", "ce", "--alpa-temperature", "5"], "belong to --method alpa"),
        (["--method", "alpa", "--outliers", "oe"], "no --outliers"),
        (["--loss", "alpa", "--trains", "mask"], "--loss takes"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert main(finetune_argv(fmnist_dir, tiny_checkpoint, out, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (out / "checkpoints").exists()
