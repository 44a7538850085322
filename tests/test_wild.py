"""WOODS and SCONE: the augmented Lagrangian, the wild mix, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import finetune_argv, interrupted_and_resumed
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.cli import main
from unleash_ood.data.base import ImageSet
from unleash_ood.errors import UserError
from unleash_ood.method.finetune import FinetuneSpec, finetune_recipe
from unleash_ood.method.wild import (
    GAUSSIAN_SEVERITIES,
    AlmSettings,
    Multiplier,
    alm_term,
    build_wild_mix,
    false_alarm_rate,
    gaussian_noise,
    mix_counts,
    wild_id_rate,
)
from unleash_ood.rng import numpy_rng
from unleash_ood.specs import OutlierSpec


def _logistic(w: float, b: float) -> nn.Linear:
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(w)
        layer.bias.fill_(b)
    return layer


def test_alm_term_by_hand() -> None:
    c = torch.tensor(0.2)
    # active: lam c + mu/2 c^2 = 0.5 * 0.2 + 2 / 2 * 0.04
    assert alm_term(c, 0.5, 2.0).item() == pytest.approx(0.14)
    # slack: mu c + lam = 2 * (-1) + 0.5 < 0, so -lam^2 / (2 mu) = -0.0625, no gradient
    c = torch.tensor(-1.0, requires_grad=True)
    term = alm_term(c, 0.5, 2.0)
    assert term.item() == pytest.approx(-0.0625)
    assert not term.requires_grad


def test_multiplier_update_by_hand() -> None:
    alm = AlmSettings()
    m = Multiplier(lam=0.0, weight=1.0)
    m.update(0.3, alm)  # violated: lam += 1 * 0.3, weight *= 1.5
    assert (m.lam, m.weight) == pytest.approx((0.3, 1.5))
    m.update(-0.1, alm)  # 1.5 * -0.1 + 0.3 >= 0: lam += -0.1; satisfied: weight kept
    assert (m.lam, m.weight) == pytest.approx((0.2, 1.5))
    m.update(-1.0, alm)  # 1.5 * -1 + 0.2 < 0: lam -= lam / weight
    assert (m.lam, m.weight) == pytest.approx((0.2 - 0.2 / 1.5, 1.5))


def test_rates_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # logsumexp: log 2, log 4
    layer = _logistic(-1.0, 0.5)

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    fa = (sig(-math.log(2) + 0.5) + sig(-math.log(4) + 0.5)) / 2
    assert false_alarm_rate(logits, layer).item() == pytest.approx(fa)
    # the margin shifts the wild energies: s - eta with eta = -10
    wild = (sig(math.log(2) + 10 - 0.5) + sig(math.log(4) + 10 - 0.5)) / 2
    assert wild_id_rate(logits, layer, -10.0).item() == pytest.approx(wild)


def _sets(n_id: int = 200, n_out: int = 100) -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(0)
    id_train = ImageSet(
        "id", torch.randint(0, 256, (n_id, 1, 8, 8), dtype=torch.uint8, generator=g)
    )
    outliers = ImageSet(
        "out", torch.randint(0, 256, (n_out, 1, 8, 8), dtype=torch.uint8, generator=g)
    )
    return id_train, outliers


def test_mix_counts() -> None:
    assert mix_counts(1000, 0.1, 0.0) == (900, 0, 100)
    assert mix_counts(1000, 0.1, 0.5) == (400, 500, 100)


def test_wild_mix_is_deterministic_per_seed_and_composed_as_recorded() -> None:
    id_train, outliers = _sets()
    a = build_wild_mix(id_train, outliers, "bundled", 0.25, 0.5, seed=3)
    b = build_wild_mix(id_train, outliers, "bundled", 0.25, 0.5, seed=3)
    c = build_wild_mix(id_train, outliers, "bundled", 0.25, 0.5, seed=4)
    x = a.images.__getitems__(range(len(a.images)))[0]
    assert torch.equal(x, b.images.__getitems__(range(len(b.images)))[0])
    assert a.composition() == b.composition()
    assert a.composition()["id_indices"] != c.composition()["id_indices"]
    comp = a.composition()
    assert (comp["size"], comp["n_id"], comp["n_shifted"], comp["n_outliers"]) == (200, 50, 100, 50)
    assert not set(comp["id_indices"]) & set(comp["shifted_indices"])
    assert (a.images.labels == -1).all()
    assert torch.equal(x[:50], id_train.__getitems__(comp["id_indices"])[0])
    assert torch.equal(x[150:], outliers.__getitems__(range(50))[0])
    assert set(comp["shift_std"]) <= set(GAUSSIAN_SEVERITIES)
    # the shifted part is its ID images plus noise of the recorded std, on the uint8 grid
    noise = x[50:150] - id_train.__getitems__(comp["shifted_indices"])[0]
    assert torch.equal(torch.round(x[50:150] * 255), x[50:150] * 255)
    interior = (x[50:150] > 0) & (x[50:150] < 1)  # not clipped
    std = torch.tensor(comp["shift_std"])[:, None, None, None].expand_as(noise)
    ratio = (noise[interior] / std[interior]).std().item()
    assert 0.9 < ratio < 1.1
    # every image's noise is its own: fetched alone or in another batch, it is the same
    assert torch.equal(a.images.__getitems__([120, 51])[0], x[[120, 51]])


def test_shifted_images_noise_by_hand() -> None:
    """One pixel's noise is the first normal of its image's stream times the image's std."""
    x = torch.full((2, 1, 1, 1), 0.5)
    got = gaussian_noise(x, np.array([0.04, 0.1]), np.array([7, 3]), seed=5)
    for i, (s, key) in enumerate(((0.04, 7), (0.1, 3))):
        z = numpy_rng(5, "wild-shift", key).standard_normal()
        assert got[i].item() == pytest.approx(round((0.5 + z * s) * 255) / 255, abs=1e-6)


def test_wild_flags_are_checked() -> None:
    with pytest.raises(UserError, match="--wild-pi must be in"):
        OutlierSpec(method="woods", wild_pi=0.0)
    with pytest.raises(UserError, match="--wild-pi must be in"):
        OutlierSpec(method="woods", wild_pi=1.5)
    with pytest.raises(UserError, match="--wild-shift"):
        OutlierSpec(method="scone", wild_pi=0.6)  # 0.6 + scone's 0.5 > 1
    with pytest.raises(UserError, match="--wild belongs to --outliers woods or scone, not oe"):
        OutlierSpec(method="oe", wild="bundled")
    spec = OutlierSpec(method="scone")
    assert (spec.wild, spec.margin, spec.shift) == ("bundled", -10.0, 0.5)
    assert OutlierSpec(method="woods").margin == 0.0


def _args(fmnist_dir, ckpt, out, *extra) -> list[str]:
    return finetune_argv(fmnist_dir, ckpt, out, "--epochs", "2", *extra)


@pytest.mark.parametrize(("outliers", "method"), [("woods", "ce"), ("scone", "um")])
def test_finetune_with_wild_data(
    capsys, fmnist_dir, tiny_checkpoint, tmp_path, outliers, method
) -> None:
    """Each with its authors' recipe (--recipe woods|scone), cut to 2 epochs."""
    out = tmp_path / outliers
    args = ["--outliers", outliers, "--method", method, "--n-masks", "2", "--wild-pi", "0.2"]
    args += ["--recipe", outliers]
    assert main(_args(fmnist_dir, tiny_checkpoint, out, *args)) == 0, capsys.readouterr().err
    final, meta = load_checkpoint(out / "checkpoints" / "final")
    assert meta["finetune"]["outliers"]["method"] == outliers
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    lr = {"woods": 0.001, "scone": 0.0001}[outliers]
    assert (recipe["lr"], recipe["schedule"], recipe["nesterov"]) == (lr, "halving", True)
    assert (recipe["augment"], recipe["weight_decay"], recipe["epochs"]) == ("none", 5e-4, 2)
    comp = json.loads((out / "wild.json").read_text())
    assert comp["n_outliers"] == round(0.2 * comp["size"])
    assert comp["n_shifted"] == (round(0.5 * comp["size"]) if outliers == "scone" else 0)
    start, _ = load_checkpoint(tiny_checkpoint)
    assert not torch.equal(final.head.weight, start.head.weight)


def test_bad_wild_flags_are_one_line_errors(capsys, fmnist_dir, tiny_checkpoint, tmp_path):
    cases = [
        (["--outliers", "woods", "--wild-pi", "1.5"], "--wild-pi must be in (0, 1]"),
        (["--wild", "bundled"], "need --outliers woods or scone"),
        (["--wild-pi", "0.3"], "need --outliers woods or scone"),
        (["--outliers", "oe", "--wild", "bundled"], "belongs to --outliers woods or scone"),
        (["--outliers", "woods", "--wild", str(tmp_path / "no.npy")], "no such file"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert main(_args(fmnist_dir, tiny_checkpoint, out, "--method", "ce", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (out / "checkpoints").exists()


def test_resume_restores_the_multipliers(tiny_benchmark, tiny_checkpoint, tmp_path: Path):
    spec = FinetuneSpec(method="ce", outliers=OutlierSpec(method="woods", wild_pi=0.2))
    recipe = finetune_recipe("ce", epochs=2, batch_size=128)
    a, b = interrupted_and_resumed(tiny_benchmark, tiny_checkpoint, spec, recipe, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "wild.json").read_text() == (tmp_path / "b" / "wild.json").read_text()
    from safetensors.torch import load_file

    state = load_file(str(next((tmp_path / "b" / "checkpoints").glob("train_state_*"))))
    assert {"objective/wild/alm", "objective/wild/logistic.weight"} <= set(state)
    assert "momentum/objective.logistic.weight" in state
    assert np.isfinite(state["objective/wild/alm"].numpy()).all()
