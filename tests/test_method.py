"""Unleashing Mask: the loss constraint, the xi estimate, fine-tuning, atypical samples, demo."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
from functools import partial

import pytest
import torch

from conftest import TORCHRUN, finetune_argv
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.evaluate import evaluate
from unleash_ood.method.constraint import (
    UMObjective,
    estimate_loss_constraint,
    masked_copy,
    mean_train_loss,
    um_loss,
    um_surrogate,
)
from unleash_ood.models import create_model

COMMON = ["--device", "cpu", "--no-progress"]


@pytest.mark.parametrize(
    ("ce", "xi", "value", "grad"),
    [
        (0.9, 0.5, 0.9, 1.0),  # above xi: plain CE, descent
        (0.2, 0.5, 0.8, -1.0),  # below xi: |0.2 - 0.5| + 0.5, ascent
    ],
)
def test_um_loss_value_and_gradient_sign(ce, xi, value, grad) -> None:
    t = torch.tensor(ce, requires_grad=True)
    loss = um_loss(t, xi)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(value)
    assert float(t.grad) == grad


def _um_on_a_share(rank: int, port: int, results) -> None:
    """One of two gloo processes: CE 1.0 on rank 0 and 3.0 on rank 1, xi 1.5."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        ce = torch.tensor([1.0, 3.0][rank], requires_grad=True)
        loss = um_loss(ce, 1.5)
        loss.backward()
        results[rank] = (float(loss.detach()), float(ce.grad))
    finally:
        torch.distributed.destroy_process_group()


def test_um_loss_under_two_processes_takes_the_side_of_the_whole_batch() -> None:
    # the global batch's CE is 2.0, above xi: both shares descend (rank 0 alone, at 1.0,
    # would ascend), and both report the global loss |2.0 - 1.5| + 1.5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(
            _um_on_a_share, (port, results), nprocs=2, start_method="spawn"
        )
        assert dict(results) == {0: (2.0, 1.0), 1: (2.0, 1.0)}


def test_um_surrogate_has_the_global_value_and_the_global_side() -> None:
    ce = torch.tensor(0.4, requires_grad=True)
    loss = um_surrogate(ce, torch.tensor(0.9), 0.5)  # the whole batch is above xi
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.9) and float(ce.grad) == 1.0
    ce.grad = None
    um_surrogate(ce, torch.tensor(0.3), 0.5).backward()
    assert float(ce.grad) == -1.0


def test_um_objective_flips_the_cross_entropy_gradient() -> None:
    """Below xi, one UM step is one CE step with the sign reversed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ce = torch.nn.functional.cross_entropy(model(x), y)
    (g_ce,) = torch.autograd.grad(ce, model.weight)
    loss, _ = UMObjective(xi=ce.item() + 1.0)(model, x, y)
    (g_um,) = torch.autograd.grad(loss, model.weight)
    assert torch.allclose(g_um, -g_ce)
    loss, _ = UMObjective(xi=ce.item() - 0.1)(model, x, y)
    (g_above,) = torch.autograd.grad(loss, model.weight)
    assert torch.allclose(g_above, g_ce)


def test_masked_copy_zeroes_the_fraction_of_every_layer() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", 10, 1, width=4)
    before = [p.clone() for p in model.parameters()]
    masked = masked_copy(model, 0.25, torch.Generator().manual_seed(1))
    for (name, a), (_, b) in zip(model.named_modules(), masked.named_modules(), strict=True):
        if isinstance(a, torch.nn.Conv2d | torch.nn.Linear):
            zeroed = int(((a.weight != 0) & (b.weight == 0)).sum())
            assert zeroed == round(0.25 * a.weight.numel()), name
            assert torch.equal(a.weight[b.weight != 0], b.weight[b.weight != 0])
    # the original is left untouched
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_estimate_is_seeded_and_above_the_models_loss(tiny_benchmark, tiny_checkpoint) -> None:
    model, _ = load_checkpoint(tiny_checkpoint)
    data = tiny_benchmark.id_train
    a = estimate_loss_constraint(model, data, mask_fraction=0.2, seed=3, n_masks=3)
    b = estimate_loss_constraint(model, data, mask_fraction=0.2, seed=3, n_masks=3)
    assert a == b and len(a.per_mask) == 3 and a.spread > 0
    assert a.train_loss == pytest.approx(mean_train_loss(model, data, "flip", 3, "cpu"))
    assert a.xi > a.train_loss and not a.is_noop


@pytest.mark.parametrize(
    ("method", "loss", "trains"),
    [
        ("ce", "ce", "weights"),
        ("um", "um", "weights"),
        ("umap", "um", "mask"),
        ("mask-ce", "ce", "mask"),
    ],
)
def test_finetune_command(
    capsys, fmnist_dir, tiny_checkpoint, tmp_path, method, loss, trains
) -> None:
    out = tmp_path / method
    how = ["--method", method] if method != "mask-ce" else ["--loss", loss, "--trains", trains]
    code = main(finetune_argv(fmnist_dir, tiny_checkpoint, out, *how, "--n-masks", "2"))
    assert code == 0, capsys.readouterr().err
    xi = json.loads((out / "xi.json").read_text())
    assert (xi["xi"] is None) == (loss == "ce")
    final, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["finetune"]["method"] == method
    assert (out / "sparsity.json").exists() == (trains == "mask")
    start, _ = load_checkpoint(tiny_checkpoint)
    changed = ~torch.isclose(final.head.weight, start.head.weight)
    if trains == "mask":  # only zeros: a learned mask drops pretrained weights, never moves one
        assert changed.any() and (final.head.weight[changed] == 0).all()
    else:
        assert changed.any()


def test_finetune_refuses_a_noop_constraint(capsys, fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "noop"
    code = main(finetune_argv(fmnist_dir, tiny_checkpoint, out, "--method", "um", "--xi", "0.0001"))
    err = capsys.readouterr().err
    assert code == 2 and "UM would train exactly like --method ce" in err
    assert not out.exists()


def test_finetune_rejects_bad_xi(capsys, fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    assert main(finetune_argv(fmnist_dir, tiny_checkpoint, tmp_path / "x", "--xi", "big")) == 2
    assert "--xi takes estimate, validate or a number" in capsys.readouterr().err


def test_atypical_command(capsys, fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "atyp"
    code = main(
        [
            "atypical",
            "--from",
            str(tiny_checkpoint),
            "--data-dir",
            str(fmnist_dir),
            "--out",
            str(out),
            "--n-masks",
            "2",
            "--mask-fraction",
            "0.2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    lines = (out / "atypical.csv").read_text().splitlines()
    assert lines[0] == "rank,index,label,prediction,loss,masked_loss,delta"
    deltas = [float(line.split(",")[-1]) for line in lines[1:]]
    assert deltas == sorted(deltas, reverse=True)
    assert (out / "atypical.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_trains_then_shows_shipped_finetunes(
    capsys, monkeypatch, fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    """--quick remakes the three fine-tunes; the default demo then loads them as the shipped
    ones, names each row's recipe, and runs the live UM fine-tune."""
    from unleash_ood import demo

    shipped = {None: tiny_checkpoint}
    monkeypatch.setattr(demo, "shipped_checkpoint", lambda method=None: shipped[method])
    monkeypatch.setattr(
        demo.DemoPlan,
        "quick",
        classmethod(
            lambda cls: cls(train=True, recipe="quick", train_images=600, n_masks=2, live_epochs=0)
        ),
    )
    trained = tmp_path / "trained"
    code = main(["demo", "--quick", "--out", str(trained), "--data-dir", str(fmnist_dir), *COMMON])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "| UMAP | quick recipe: 3 epochs, lr 0.1 cosine, xi " in printed
    assert "not the method's result" in printed
    result = json.loads((trained / "demo.json").read_text())
    assert set(result["evaluations"]) == {"base", "ce", "um", "umap"}
    assert result["train_images"] == 600 and (trained / "config.json").exists()
    assert (trained / "comparison.png").exists() and (trained / "umap" / "sparsity.json").exists()
    assert all((trained / m / "config.json").exists() for m in ("ce", "um", "umap"))
    assert main(["demo", "--out", str(trained), *COMMON]) == 2  # never overwrites a demo

    shipped.update({m: trained / m / "checkpoints" / "final" for m in ("ce", "um", "umap")})
    monkeypatch.setattr(demo, "DemoPlan", partial(demo.DemoPlan, live_images=300))
    shown = tmp_path / "shown"
    code = main(["demo", "--out", str(shown), "--data-dir", str(fmnist_dir), *COMMON])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "| base | pretrained: " in printed and "| CE control | quick recipe: 3 epochs" in printed
    assert "not the method's result" in printed  # shipped quick-recipe fine-tunes say so too
    assert "## Live: UM on 300 training images at xi = " in printed
    assert "train CE" in printed and not (shown / "ce").exists()


def test_finetune_validate_picks_xi_on_validation_data(
    capsys, fmnist_dir, tiny_benchmark, tiny_checkpoint, tmp_path
) -> None:
    out = tmp_path / "validate"
    args = ["--method", "um", "--xi", "validate", "--xi-grid", "1,2", "--n-masks", "2"]
    code = main(finetune_argv(fmnist_dir, tiny_checkpoint, out, *args, "--track"))
    assert code == 0, capsys.readouterr().err
    choice = json.loads((out / "xi.json").read_text())
    assert choice["source"] == "validate" and len(choice["grid"]) == 2
    # the rule: best OOD-validation AUROC among candidates within the accuracy tolerance
    base, _ = load_checkpoint(tiny_checkpoint)
    base_acc = evaluate(base, tiny_benchmark, "energy", splits=("val",)).accuracy["id_val"]
    eligible = [g for g in choice["grid"] if g["id_val_acc"] >= base_acc - 0.01] or choice["grid"]
    assert choice["xi"] == max(eligible, key=lambda g: g["val_auroc"])["xi"]
    # --track follows the chosen run's epochs into this run's track.csv
    with open(out / "track.csv") as f:
        assert {int(r["epoch"]) for r in csv.DictReader(f)} == {1}
    _, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["finetune"]["xi"] == choice["xi"]


def test_torchrun_validate_waits_for_the_main_process(
    fmnist_dir, tiny_checkpoint, tmp_path
) -> None:
    """Two processes: each candidate's final model is read only after the main process wrote
    it (it used to be read too early by the other process), and only the main one writes."""
    out = tmp_path / "validate"
    args = ["--method", "um", "--xi", "validate", "--xi-grid", "1,2", "--n-masks", "2"]
    argv = finetune_argv(fmnist_dir, tiny_checkpoint, out, *args)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [*TORCHRUN, "-m", "unleash_ood", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    choice = json.loads((out / "xi.json").read_text())
    assert choice["source"] == "validate" and len(choice["grid"]) == 2
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    _, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["finetune"]["xi"] == choice["xi"]
