"""MOOD, small: blockwise masks, the masked-patch loss, the ViT, and both stages end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import detector_argv, interrupt_detector_at_second_epoch
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.generative import create_detector
from unleash_ood.generative.mim import (
    MaskedImageModel,
    blockwise_mask,
    masked_patch_error,
    normalised_patches,
    patchify,
)
from unleash_ood.generative.mood import is_mood
from unleash_ood.models import create_model
from unleash_ood.train import Trainer

TINY = ("dim=16", "depth=1", "heads=2")


def test_patchify_orders_patches_as_the_patch_embedding_grid() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    by_hand = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert patchify(x, 2).tolist() == [by_hand]
    # A convolution whose output channel k copies pixel k of its patch gives the same rows.
    conv = nn.Conv2d(1, 4, 2, stride=2, bias=False)
    conv.weight.data = torch.eye(4).view(4, 1, 2, 2)
    tokens = conv(x).flatten(2).transpose(1, 2)
    assert torch.equal(tokens, patchify(x, 2))


def test_patch_targets_are_normalised_per_patch() -> None:
    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, :, :2] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # mean 1.5, variance 1.25
    x[0, 0, :, 2:] = 0.7  # a flat patch
    t = normalised_patches(x, 2)
    expected = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / (1.25 + 1e-6) ** 0.5
    assert torch.allclose(t[0, 0], expected)
    assert torch.equal(t[0, 1], torch.zeros(4))


def test_masked_patch_error_reads_masked_patches_only() -> None:
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])  # 1 image, 3 patches of 2
    pred = torch.zeros_like(target)
    mask = torch.tensor([[True, True, False]])
    err, count = masked_patch_error(pred, target, mask)
    # Patch errors: (1 + 1) / 2 = 1 and (4 + 0) / 2 = 2; the visible patch's 81 is left out.
    assert err.tolist() == [3.0] and count.tolist() == [2]


def test_training_loss_sends_no_gradient_to_visible_patches(monkeypatch) -> None:
    torch.manual_seed(0)
    model = MaskedImageModel(1, 8, patch_size=4, dim=8, depth=1, heads=2, min_block=1)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    monkeypatch.setattr(model, "masks", lambda n, generator=None: mask)
    kept = {}
    model.decoder.register_forward_hook(lambda m, i, out: kept.update(out=out) or out.retain_grad())
    x = torch.rand(2, 1, 8, 8)
    loss, _ = model.loss(x)
    loss.backward()
    grad = kept["out"].grad.abs().sum(-1)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask] > 0)
    # The loss is the mean over the batch's three masked patches of their squared error.
    target = normalised_patches(x, 4)
    per_patch = (kept["out"] - target).pow(2).mean(-1)
    assert torch.allclose(loss, per_patch[mask].sum() / 3)


def test_blockwise_masks_cover_the_ratio_without_overshooting() -> None:
    g = torch.Generator().manual_seed(0)
    counts = [int(blockwise_mask(7, 20, 4, g).sum()) for _ in range(200)]
    assert max(counts) == 20 and sum(counts) / len(counts) > 19
    a = blockwise_mask(7, 20, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, blockwise_mask(7, 20, 4, torch.Generator().manual_seed(3)))
    model = MaskedImageModel(1, 28, dim=8, depth=1, heads=2)
    assert model.num_masked == 20 and model.masks(5).shape == (5, 49)


def test_validation_loss_is_deterministic_per_image() -> None:
    torch.manual_seed(0)
    model = MaskedImageModel(1, 28, dim=8, depth=1, heads=2).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) and model(x).shape == (3,)


@pytest.mark.parametrize(("shape", "grid"), [((1, 28, 28), 7), ((3, 32, 32), 8)])
def test_vit_shapes_and_pooled_features(shape, grid) -> None:
    vit = create_model("vit", 10, shape[0], image_size=shape[1], dim=16, depth=2, heads=2)
    x = torch.rand(2, *shape)
    feats, fmap = vit.features_with_map(x)
    assert fmap.shape == (2, 16, grid, grid) and feats.shape == (2, 16)
    assert torch.allclose(vit.features(x), feats, atol=1e-6)
    assert vit(x).shape == (2, 10) and vit.exposes_map()


def test_bad_model_options_fail_with_a_hint() -> None:
    with pytest.raises(UserError, match="patch_size 5 does not divide"):
        create_detector("mim", 1, 28, patch_size=5)
    with pytest.raises(UserError, match="mask_ratio must lie in"):
        create_detector("mim", 1, 28, mask_ratio=1.5)
    with pytest.raises(UserError, match="min_block must lie in"):
        create_detector("mim", 1, 28, min_block=30)
    with pytest.raises(UserError, match="does not split into 3 heads"):
        create_model("vit", 10, 1, dim=16, heads=3)


def test_mood_runs_are_told_apart_by_their_sidecars() -> None:
    assert is_mood({"architecture": "mim", "detector": True})
    assert is_mood({"architecture": "vit", "pretraining": {"kind": "mim"}})
    assert not is_mood({"architecture": "vit"})
    assert not is_mood({"architecture": "vae", "pretraining": "mim"})  # malformed: not MOOD


def train_argv(run, *extra: str) -> list[str]:
    return detector_argv("mim", run, TINY, 2, "--finetune-epochs", "2", *extra)


def interrupt_finetune_at_second_epoch(monkeypatch):
    """Ctrl-C as stage 2's second epoch starts; returns the function that lets it run on."""
    train_epoch = Trainer.train_epoch

    def interrupted(self, epoch: int):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def same_weights(a, b) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_mim_trains_both_stages_resumes_exactly_and_evaluates(
    capsys, monkeypatch, small_fmnist, tmp_path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_argv(straight)) == 0, capsys.readouterr().err
    stage1 = json.loads((straight / "checkpoints" / "last.json").read_text())
    assert stage1["architecture"] == "mim" and stage1["detector"] and stage1["epoch"] == 2
    stage2 = json.loads((straight / "finetune" / "checkpoints" / "last.json").read_text())
    assert stage2["architecture"] == "vit" and stage2["epoch"] == 2
    assert stage2["pretraining"] == {
        "kind": "mim",
        "epoch": 2,
        "options": {
            "patch_size": 4,
            "dim": 16,
            "depth": 1,
            "heads": 2,
            "mask_ratio": 0.4,
            "min_block": 4,
        },
    }
    assert stage2["recipe"]["epochs"] == 2 and stage2["recipe"]["lr"] == 1e-3
    assert stage2["optimizer"] == "adam"
    state = load_file(str(straight / "finetune" / "checkpoints" / "train_state_002.safetensors"))
    assert "optimizer/exp_avg_sq/head.weight" in state and not any("momentum/" in k for k in state)

    # Ctrl-C in each stage, each followed by --resume: the same weights as straight through.
    let_run = interrupt_detector_at_second_epoch(monkeypatch)
    assert main(train_argv(resumed)) == 130
    assert not (resumed / "finetune" / "checkpoints").exists()
    let_run()
    let_run = interrupt_finetune_at_second_epoch(monkeypatch)
    assert main(train_argv(resumed, "--resume")) == 130
    assert (
        json.loads((resumed / "finetune" / "checkpoints" / "last.json").read_text())["epoch"] == 1
    )
    let_run()
    assert main(train_argv(resumed, "--resume")) == 0, capsys.readouterr().err
    for ckpt in ("checkpoints/last", "finetune/checkpoints/last"):
        assert same_weights(straight / f"{ckpt}.safetensors", resumed / f"{ckpt}.safetensors")
    assert main(train_argv(straight)) == 2
    assert "already holds a training run" in capsys.readouterr().err

    # The fine-tuned ViT is a plain classifier checkpoint.
    model, _ = load_checkpoint(straight / "finetune" / "checkpoints" / "last", "cpu", 10)
    assert model.encoder.grid == 7
    out = tmp_path / "eval"
    argv = ["detector", "evaluate", "--from", str(straight), "--out", str(out), "--device", "cpu"]
    code = main([*argv, "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert {"metrics.json", "metrics.md", "metrics.csv", "histograms.png", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} == {"ssd"}  # MOOD's own score by default
    assert {r["dataset"] for r in rows} >= {"mnist", "letters", "mean"}
    assert all(0 <= r["auroc"] <= 1 for r in rows)
    assert "| ssd | mean |" in printed

    out2 = tmp_path / "eval2"
    ckpt = straight / "finetune" / "checkpoints" / "epoch_001"
    code = main(
        [*argv[:3], str(ckpt), "--scores", "knn,mode", "--out", str(out2), "--device", "cpu"]
    )
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out2 / "metrics.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} == {"knn", "mode"}
    out3 = tmp_path / "eval3"
    last = str(straight / "finetune" / "checkpoints" / "last")
    flags = ["--scores", "mahalanobis,energy", "--out", str(out3), "--device", "cpu"]
    code = main(["evaluate", "--checkpoint", last, *flags, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out3 / "metrics.json").read_text())["accuracy"]


def test_mim_commands_refuse_bad_input(capsys, small_fmnist, tmp_path) -> None:
    assert main(train_argv(tmp_path / "r", "--model-arg", "patch_size=5")) == 2
    assert "patch_size 5 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    vae = [a if a != "mim" else "vae" for a in train_argv(tmp_path / "v")][:4]
    assert main([*vae, "--finetune-epochs", "2", "--out", str(tmp_path / "v")]) == 2
    assert "--finetune-epochs and --finetune-lr set stage 2 of --kind mim" in (
        capsys.readouterr().err
    )
    assert main(train_argv(tmp_path / "r", "--finetune-lr", "-1")) == 2
    assert "--finetune-lr must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

    run = tmp_path / "run"
    argv = train_argv(run, "--epochs", "1", "--finetune-epochs", "1")
    assert main(argv) == 0, capsys.readouterr().err
    evaluate = ["detector", "evaluate", "--device", "cpu", "--no-progress"]
    out = tmp_path / "e"
    assert main([*evaluate, "--from", str(run), "--scores", "elbo", "--out", str(out)]) == 2
    assert "elbo" in capsys.readouterr().err and not out.exists()
    stage1 = str(run / "checkpoints" / "last")
    assert main([*evaluate, "--from", stage1, "--out", str(out)]) == 2
    assert "stage-1 (masked-image) checkpoint" in capsys.readouterr().err and not out.exists()
    for f in (run / "finetune" / "checkpoints").glob("last.*"):
        f.unlink()
    assert main([*evaluate, "--from", str(run), "--out", str(out)]) == 2
    assert "holds no fine-tuned classifier yet" in capsys.readouterr().err and not out.exists()
