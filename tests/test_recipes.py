"""Recipes, specs that validate themselves, training data with label noise, named streams."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import finetune_argv
from unleash_ood.cli import build_parser, main
from unleash_ood.cli.args import RECIPE_FLAGS, recipe_from
from unleash_ood.cli.training import FINETUNE_FLAGS, OUTLIER_FLAGS, _finetune_recipe
from unleash_ood.data.base import ImageSet
from unleash_ood.data.noise import TrainingData, flip_labels, stratified_subset
from unleash_ood.errors import UserError
from unleash_ood.method.atypical import Atypicality, precision_at_k
from unleash_ood.rng import numpy_rng, torch_generator
from unleash_ood.specs import (
    METHODS,
    PAPER_RECIPE,
    RECIPES,
    FinetuneSpec,
    OutlierSpec,
    Recipe,
    default_recipe_name,
    finetune_recipe,
    method_named,
)


def test_paper_recipes_match_the_official_configs() -> None:
    paper = RECIPES["paper"]
    assert (paper.epochs, paper.lr, paper.schedule, paper.batch_size) == (100, 0.1, "cosine", 256)
    assert (paper.momentum, paper.weight_decay, paper.nesterov) == (0.9, 1e-4, False)
    oe = RECIPES["paper-oe"]
    assert (oe.epochs, oe.lr) == (10, 0.01) and oe.batch_size == 256
    assert default_recipe_name(outliers=False) == "paper"
    assert default_recipe_name(outliers=True) == "paper-oe"
    assert finetune_recipe("umap", "quick").lr == 0.1 and finetune_recipe("um", "quick").lr == 0.01
    assert finetune_recipe("um", epochs=30).epochs == 30 and finetune_recipe("um") == PAPER_RECIPE
    with pytest.raises(UserError, match="unknown recipe"):
        finetune_recipe("um", "long")


def test_wild_recipes_match_the_authors_scripts() -> None:
    # jkatzsam/woods_ood and deeplearning-wisc/scone, CIFAR/train.py and CIFAR/run.sh
    woods, scone = RECIPES["woods"], RECIPES["scone"]
    assert (woods.epochs, woods.batch_size, woods.lr, scone.lr) == (100, 128, 1e-3, 1e-4)
    assert (woods.momentum, woods.nesterov, woods.weight_decay) == (0.9, True, 5e-4)
    assert woods.schedule == scone.schedule == "halving"
    # their code augments nothing, whatever the benchmark; an explicit --augment still wins
    assert finetune_recipe("ce", "woods", benchmark="cifar10").augment == "none"
    assert finetune_recipe("ce", "scone", benchmark="cifar10", augment="flip").augment == "flip"
    args = ["finetune", "--from", "m", "--benchmark", "cifar10", "--recipe", "scone", "--out", "r"]
    name, recipe = _finetune_recipe(build_parser().parse_args(args), "ce", outliers=True)
    assert (name, recipe.augment, recipe.lr) == ("scone", "none", 1e-4)


def test_the_benchmark_sets_the_augmentation_unless_one_is_given() -> None:
    # the official CIFAR pipeline (tmlr-group/Unleashing-Mask, data/cifar.py):
    # RandomCrop(32, padding=4) + RandomHorizontalFlip
    assert finetune_recipe("um", benchmark="cifar10").augment == "crop+flip"
    assert finetune_recipe("um", "paper-oe", benchmark="cifar100-openood").augment == "crop+flip"
    assert finetune_recipe("um", benchmark="fmnist").augment == "flip"
    assert finetune_recipe("um", benchmark="cifar10", augment="none").augment == "none"
    parser = build_parser()
    for argv, augment in (
        (["pretrain", "--benchmark", "cifar100", "--out", "r"], "crop+flip"),
        (["pretrain", "--out", "r"], "flip"),
        (["pretrain", "--benchmark", "cifar10", "--augment", "flip", "--out", "r"], "flip"),
    ):
        assert recipe_from(parser.parse_args(argv)).augment == augment, argv
    for argv, augment in (
        (["finetune", "--from", "m", "--benchmark", "cifar10", "--out", "r"], "crop+flip"),
        (["finetune", "--from", "m", "--augment", "crop", "--out", "r"], "crop"),
        (["finetune", "--from", "m", "--out", "r"], "flip"),
    ):
        _, recipe = _finetune_recipe(parser.parse_args(argv), "um", outliers=False)
        assert recipe.augment == augment, argv


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": math.nan}, "--lr must be a finite number > 0"),
        ({"lr": -0.1}, "--lr must be a finite number > 0"),
        ({"lr": math.inf}, "--lr must be a finite number > 0"),
        ({"momentum": -0.5}, "--momentum must be a finite number >= 0"),
        ({"momentum": 1.0}, "--momentum must be below 1"),
        ({"weight_decay": math.nan}, "--weight-decay must be"),
        ({"epochs": 0}, "--epochs must be a positive integer"),
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"schedule": "linear"}, "unknown schedule"),
        ({"nesterov": True, "momentum": 0.0}, "--nesterov needs a positive --momentum"),
        ({"seed": -1}, "--seed must be a non-negative integer"),
    ],
)
def test_an_invalid_recipe_cannot_exist(changes, message) -> None:
    with pytest.raises(UserError, match=message):
        Recipe(**changes)
    with pytest.raises(UserError, match=message):
        replace(Recipe(), **changes)  # replace validates too


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FinetuneSpec(xi="nan"), "--xi must be a finite number > 0"),
        (lambda: FinetuneSpec(xi="inf"), "--xi must be a finite number > 0"),
        (lambda: FinetuneSpec(xi="-1"), "--xi must be a finite number > 0"),
        (lambda: FinetuneSpec(xi="big"), "--xi takes estimate, validate or a number"),
        (lambda: FinetuneSpec(xi_reduction="max"), "--xi-reduction takes mean or median"),
        (lambda: FinetuneSpec(n_masks=0), "--n-masks must be a positive integer"),
        (lambda: FinetuneSpec(mask_fraction=1.5), "--mask-fraction must be in"),
        (lambda: FinetuneSpec(xi_grid=(1.0, math.nan)), "every --xi-grid value"),
        (lambda: OutlierSpec(aux_ratio=math.nan), "--aux-ratio must be"),
        (lambda: OutlierSpec(weight=-1.0), "--aux-weight must be"),
        (lambda: OutlierSpec(method="vos"), "unknown outlier method"),
    ],
)
def test_an_invalid_finetune_spec_cannot_exist(make, message) -> None:
    with pytest.raises(UserError, match=message):
        make()


def test_named_streams_are_reproducible_and_independent() -> None:
    a = numpy_rng(3, "label-noise").integers(0, 1000, 20)
    assert np.array_equal(a, numpy_rng(3, "label-noise").integers(0, 1000, 20))
    assert not np.array_equal(a, numpy_rng(3, "subset").integers(0, 1000, 20))
    assert not np.array_equal(a, numpy_rng(4, "label-noise").integers(0, 1000, 20))
    g1, g2 = torch_generator(3, "x", 1), torch_generator(3, "x", 2)
    assert not torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_label_noise_flips_exactly_the_fraction_to_other_classes() -> None:
    labels = np.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.2, seed=0)
    assert len(flipped) == 200 and np.all(np.diff(flipped) > 0)
    assert np.all(noisy[flipped] != labels[flipped])
    kept = np.setdiff1d(np.arange(1000), flipped)
    assert np.array_equal(noisy[kept], labels[kept])
    again, flipped_again = flip_labels(labels, 0.2, seed=0)
    assert np.array_equal(again, noisy) and np.array_equal(flipped_again, flipped)
    assert not np.array_equal(flip_labels(labels, 0.2, seed=1)[1], flipped)


def test_stratified_subset_keeps_class_proportions() -> None:
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    index = stratified_subset(labels, 100, seed=0)
    assert len(index) == 100 and len(np.unique(index)) == 100
    assert np.bincount(labels[index]).tolist() == [10, 20, 30, 40]


def test_training_data_applies_and_validates() -> None:
    images = torch.zeros(50, 1, 4, 4, dtype=torch.uint8)
    train = ImageSet("t", images, torch.arange(50) % 5)
    data, flipped = TrainingData(size=20, label_noise=0.25, seed=1).apply(train)
    assert len(data) == 20 and len(flipped) == 5
    assert TrainingData().apply(train)[0] is train
    for bad in ([1], {"size": -3}, {"label_noise": 1.5}, {"label_noise": "0.2"}, {"x": 1}):
        with pytest.raises(UserError):
            TrainingData.from_dict(bad)


def test_precision_at_k_counts_flipped_samples_among_the_most_atypical() -> None:
    # deltas rank samples 4, 3, 2, 1, 0; samples 3 and 0 are flipped
    a = Atypicality(np.zeros(5), np.array([0.1, 0.2, 0.3, 0.4, 0.5]), np.zeros(5, int))
    out = precision_at_k(a, np.array([0, 3]), ks=(1, 2, 4))
    assert out == {
        "chance": 0.4,
        "n_flipped": 2,
        "precision@1": 0.0,
        "precision@2": 0.5,
        "precision@4": 0.25,
    }


def test_cli_imports_no_torch_for_help() -> None:
    code = (
        "import sys; from unleash_ood.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_flag_has_help() -> None:
    import argparse

    from unleash_ood.cli import build_parser

    def check(parser: argparse.ArgumentParser, path: str) -> int:
        n = 0
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                n += sum(check(p, f"{path} {name}") for name, p in action.choices.items())
            else:
                assert action.help, f"{path} {action.option_strings or action.dest}"
                n += 1
        return n

    assert check(build_parser(), "unleash") > 100


def test_finetune_records_recipe_and_logs_plain_ce(capsys, fmnist_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "um"
    args = ["--method", "um", "--xi", "5", "--recipe", "quick", "--lr", "0.02", "--n-masks", "2"]
    assert main(finetune_argv(fmnist_dir, tiny_checkpoint, out, *args)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe_name"] == "quick"
    assert config["recipe"]["lr"] == 0.02 and config["recipe"]["epochs"] == 1  # flags override
    assert config["recipe"]["weight_decay"] == 1e-4  # the rest from the recipe
    assert config["recipe"]["augment"] == "flip"  # fmnist's
    line = (out / "log.txt").read_text().splitlines()[-1]
    objective = float(line.split("train loss ")[1].split()[0])
    ce = float(line.split("train CE ")[1].split()[0])
    assert objective >= 5 > ce  # the objective never falls below xi; the CE sits under it
    printed = capsys.readouterr().out
    assert "recipe quick: 1 epoch, lr 0.02" in printed
    assert line in printed  # --no-progress hides bars, not the per-epoch lines


def test_label_noise_pretrain_finetune_and_atypical(capsys, fmnist_dir, tmp_path) -> None:
    run = tmp_path / "noisy"
    common = ["--data-dir", str(fmnist_dir), "--device", "cpu", "--no-progress"]
    argv = ["pretrain", "--out", str(run), "--epochs", "1", "--train-size", "600"]
    argv += ["--label-noise", "0.2", "--model-arg", "width=4", "--seed", "3", *common]
    assert main(argv) == 0, capsys.readouterr().err
    noise = json.loads((run / "label_noise.json").read_text())
    assert len(noise["flipped"]) == 120 and noise["seed"] == 3
    assert json.loads((run / "config.json").read_text())["train_size"] == 600
    last = str(run / "checkpoints" / "last")
    out = tmp_path / "ce"
    assert main(finetune_argv(fmnist_dir, run / "checkpoints" / "last", out, "--method", "ce")) == 0
    assert json.loads((out / "config.json").read_text())["train_size"] == 600
    aty = tmp_path / "aty"
    argv = ["atypical", "--from", last, "--out", str(aty), "--n-masks", "1", *common[:4]]
    assert main(argv) == 0, capsys.readouterr().err
    found = json.loads((aty / "label_noise_precision.json").read_text())
    assert found["n_flipped"] == 120 and found["chance"] == pytest.approx(0.2)
    assert "flipped labels among the most atypical" in capsys.readouterr().out


def test_detector_kinds_of_the_parser_match_the_trainer() -> None:
    from unleash_ood.generative.trainer import DEFAULT_RECIPES
    from unleash_ood.specs import DETECTOR_KINDS

    assert tuple(DEFAULT_RECIPES) == DETECTOR_KINDS


def test_a_method_is_a_loss_times_what_trains() -> None:
    parts = {m: (FinetuneSpec(method=m).loss, FinetuneSpec(method=m).trains) for m in METHODS}
    assert parts == {
        "um": ("um", "weights"),
        "umap": ("um", "mask"),
        "ce": ("ce", "weights"),
        "mask-ce": ("ce", "mask"),
        "alpa": ("alpa", "weights"),
    }
    assert all(method_named(*p) == m for m, p in parts.items())
    with pytest.raises(UserError, match="--loss takes um or ce or alpa"):
        method_named("mse", "weights")


def test_training_flags_are_built_from_the_specs_fields() -> None:
    """Each Recipe / FinetuneSpec knob has its flag, with the field's default and help."""
    import dataclasses

    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    flags = {a.dest: a for a in finetune._actions}
    specs = ((Recipe, RECIPE_FLAGS), (FinetuneSpec, FINETUNE_FLAGS), (OutlierSpec, OUTLIER_FLAGS))
    for spec, names in specs:
        for f in dataclasses.fields(spec):
            if f.metadata.get("help"):
                assert f.name in names, f"{spec.__name__}.{f.name} has no flag"
                assert flags[f.name].help.startswith(f.metadata["help"].replace("%", "%%"))
    assert flags["n_masks"].default == FinetuneSpec().n_masks
    assert flags["epochs"].default is None  # finetune: the --recipe's value unless given


def test_recipe_flag_help_names_the_default_each_command_uses() -> None:
    """finetune's unset flags take the --recipe's value; detector train has no --recipe, its
    unset flags take the --kind's own recipe, and its help says so."""
    commands = build_parser()._subparsers._group_actions[0].choices
    finetune = {a.dest: a for a in commands["finetune"]._actions}
    detector = commands["detector"]._subparsers._group_actions[0].choices["train"]
    train = {a.dest: a for a in detector._actions}
    assert finetune["lr"].help.endswith("(default: the --recipe's value)")
    assert train["lr"].help.endswith("(default: the --kind's own recipe)")
    assert train["augment"].help == "none, flip, crop, crop+flip (default: the --kind's own recipe)"
    assert "recipe" not in train
