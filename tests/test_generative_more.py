"""AMA: its mirrored pairs, losses and score on hand-computed cases, its training step, the
epoch selection on OOD validation sets, and the commands; DiffPath: the schedule, the DDIM
inversion and the path statistics by hand, its mixture score, and the commands."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import detector_argv, interrupt_detector_at_second_epoch
from unleash_ood.cli import main
from unleash_ood.data.base import ImageSet
from unleash_ood.errors import UserError
from unleash_ood.generative import create_detector, parse_detector_scores
from unleash_ood.generative.ama import (
    AMA,
    AMAScore,
    feature_distance,
    gradient_penalty,
    mirrored_pairs,
)
from unleash_ood.generative.diffpath import DiffPath, path_statistics
from unleash_ood.generative.diffusion import cosine_alphas_cumprod
from unleash_ood.generative.trainer import (
    DEFAULT_RECIPES,
    load_detector,
    selection_auroc,
    train_detector,
)
from unleash_ood.metrics import ood_metrics

TINY_AMA = {"width": 2, "gen_width": 4, "critic_width": 4, "latent": 4}


def half_grey_ama() -> AMA:
    """An AMA whose generator draws 0.5 everywhere (in [-1, 1]) and whose critic is replaced
    by sums: ``features`` = each channel summed over space, ``D`` = mean of the second half."""
    torch.manual_seed(0)
    model = create_detector("ama", 1, 28, **TINY_AMA)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.zero_()
        model.generator[-2].bias.fill_(math.atanh(0.5))
    model.critic.features = lambda pair: pair.sum((2, 3))
    model.critic.forward = lambda pair: pair[:, 1:].mean((1, 2, 3))
    return model.eval()


def test_mirrored_pairs_stack_along_channels() -> None:
    x, rec = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    real, fake = mirrored_pairs(x, rec)
    assert real.shape == fake.shape == (2, 6, 4, 4)
    assert torch.equal(real[:, :3], x) and torch.equal(real[:, 3:], x)
    assert torch.equal(fake[:, :3], x) and torch.equal(fake[:, 3:], rec)


def test_feature_distance_is_l1_per_sample() -> None:
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.5], [0.0, 3.0, -1.0]])
    assert feature_distance(a, b).tolist() == [4.0, 4.0]


def test_ama_score_by_hand() -> None:
    """White and black 28x28 images, padded with black (-1) to 32: the pair (x, x) sums to
    (S, S), the pair (x, G(E(x))) to (S, 0.5 * 1024), so the distance is |S - 512|."""
    model = half_grey_ama()
    x = torch.stack([torch.ones(1, 28, 28), torch.zeros(1, 28, 28)])
    s_white, s_black = 784 - 240, -1024
    expected = [abs(s_white - 512), abs(s_black - 512)]
    assert model(x).tolist() == pytest.approx(expected, rel=1e-5)
    assert AMAScore().score_batch(model, x).tolist() == pytest.approx(
        [-e for e in expected], rel=1e-5
    )


def test_ama_losses_by_hand() -> None:
    """Critic: mean D(x, G(E(x))) - mean D(x, x) = 0.5 - mean(x); autoencoder: -0.5 and
    the mean latent norm."""
    model = half_grey_ama()
    x = model.prepare(torch.rand(3, 1, 28, 28))
    assert model.critic_loss(x).item() == pytest.approx(0.5 - x.mean().item(), rel=1e-5)
    adversarial, norm = model.autoencoder_loss(x)
    assert adversarial.item() == pytest.approx(-0.5, rel=1e-5)
    assert norm.item() == pytest.approx(model.encoder(x).norm(dim=1).mean().item(), rel=1e-5)


def test_gradient_penalty_by_hand() -> None:
    """A linear critic ``D = sum(3 * first + 4 * second)`` has gradient (3, 4) at every pixel
    whatever the interpolation: norm 5, penalty 10 * (5 - 1)^2."""
    x, rec = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)

    def critic(pair: torch.Tensor) -> torch.Tensor:
        return (3 * pair[:, 0] + 4 * pair[:, 1]).sum((1, 2))

    assert gradient_penalty(critic, x, rec, 10.0).item() == pytest.approx(160.0)
    assert gradient_penalty(critic, x, rec, 0.5).item() == pytest.approx(8.0)


def test_critic_loss_adds_the_gradient_penalty() -> None:
    """The stand-in critic's D is the mean of the second image over its 32 x 32 pixels: its
    gradient is 1/1024 on that channel and 0 on the first, so the penalty is
    10 * (1 - 1/1024)^2 on top of the Wasserstein term."""
    model = half_grey_ama()
    x = model.prepare(torch.rand(3, 1, 28, 28))
    model.gradient_penalty = 10.0
    expected = 0.5 - x.mean().item() + 10 * (1 - 1 / 1024) ** 2
    assert model.critic_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_spectral_norm_bounds_every_critic_layer() -> None:
    """After a few training passes, every critic weight as used has largest singular value 1;
    the encoder and generator are left alone."""
    torch.manual_seed(0)
    model = create_detector("ama", 1, 28, spectral_norm=True, **TINY_AMA).train()
    layers = [
        m for m in model.critic.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert len(layers) == 11
    for _ in range(30):
        model.critic(torch.rand(4, 2, 32, 32))
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=1e-3)
    assert not any("parametrizations" in n for n, _ in model.encoder.named_parameters())
    assert model.options()["spectral_norm"] is True
    with pytest.raises(UserError, match="spectral_norm takes true or false"):
        create_detector("ama", 1, 28, spectral_norm=1)
    with pytest.raises(UserError, match="gradient_penalty takes a finite number >= 0"):
        create_detector("ama", 1, 28, gradient_penalty=-1)


def test_prepare_scales_and_pads_to_32() -> None:
    model = create_detector("ama", 1, 28, **TINY_AMA)
    x = torch.rand(2, 1, 28, 28)
    p = model.prepare(x)
    assert p.shape == (2, 1, 32, 32)
    assert torch.allclose(p[..., 2:30, 2:30], 2 * x - 1)
    assert (p[..., :2, :] == -1).all() and (p[..., :, 30:] == -1).all()


def test_train_step_steps_the_critic_more_often_and_never_in_the_autoencoder_step() -> None:
    torch.manual_seed(0)
    model = create_detector("ama", 1, 28, critic_steps=3, **TINY_AMA).train()
    r = DEFAULT_RECIPES["ama"]
    opt = torch.optim.Adam(model.param_groups(), lr=r.lr, betas=(r.momentum, r.beta2))
    assert opt.param_groups[2]["betas"] == (0.5, 0.9) and opt.param_groups[0]["betas"] == (0, 0.9)
    loss, parts = model.train_step(torch.rand(8, 1, 28, 28), opt, 0.0)
    assert math.isfinite(loss.item()) and set(parts) == {"critic", "latent_norm"}
    steps = {n: int(opt.state[p]["step"]) for n, p in model.named_parameters()}
    assert {v for n, v in steps.items() if n.startswith("critic.")} == {3}
    assert {v for n, v in steps.items() if not n.startswith("critic.")} == {1}


def test_ama_refuses_bad_options() -> None:
    with pytest.raises(UserError, match="side 32 or 28"):
        create_detector("ama", 1, 36)
    with pytest.raises(UserError, match="side 32 or 28"):
        create_detector("ama", 1, 27)
    with pytest.raises(UserError, match="critic_steps takes a positive integer"):
        create_detector("ama", 1, 28, critic_steps=0)
    with pytest.raises(UserError, match="does not accept lossy"):
        create_detector("ama", 1, 28, lossy="none")
    with pytest.raises(UserError, match="unknown score 'elbo' for a ama detector"):
        parse_detector_scores("elbo", "ama")
    assert [s.name for s in parse_detector_scores("all", "ama")] == ["ama"]


class Bright(torch.nn.Module):
    """A stand-in detector: its "anomaly" is the mean brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def test_selection_auroc_is_the_mean_validation_auroc() -> None:
    g = torch.Generator().manual_seed(0)

    def images(name: str, high: int) -> ImageSet:
        return ImageSet(name, torch.randint(0, high, (20, 1, 4, 4), generator=g, dtype=torch.uint8))

    id_val, dark, bright = images("id", 120), images("dark", 60), images("bright", 256)
    got = selection_auroc(Bright(), id_val, {"dark": dark, "bright": bright}, torch.device("cpu"))

    def minus_mean(data: ImageSet) -> np.ndarray:
        return -data.images.double().div(255).flatten(1).mean(1).numpy()

    expected = [ood_metrics(minus_mean(id_val), minus_mean(d))["auroc"] for d in (dark, bright)]
    assert got == pytest.approx(sum(expected) / 2)
    assert expected[0] < 0.5 < expected[1]


class Untouchable:
    """A test set that fails any use: epoch selection must not read it."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a test set was read ({name})")

    def __len__(self) -> int:
        raise AssertionError("a test set was read (len)")


def test_epoch_selection_reads_only_validation_sets(small_fmnist, tmp_path) -> None:
    bench = dataclasses.replace(
        small_fmnist, id_test=Untouchable(), ood_test={"mnist": Untouchable()}
    )
    recipe = dataclasses.replace(
        DEFAULT_RECIPES["ama"],
        epochs=3,
        batch_size=32,
        model_kwargs={**TINY_AMA, "critic_steps": 1},
    )
    out = tmp_path / "run"
    train_detector(bench, recipe, out, torch.device("cpu"), progress=False)
    ckpt = out / "checkpoints"
    log = (out / "log.txt").read_text()
    aurocs = [float(v) for v in re.findall(r"ood-val auroc (\S+)", log)]
    assert len(aurocs) == 3
    best = json.loads((ckpt / "best.json").read_text())
    first = int(np.argmax(aurocs))  # the earliest of equal bests stays
    assert best["epoch"] == first + 1 and best["selection"]["sets"] == sorted(bench.ood_val)
    assert best["selection"]["auroc"] == pytest.approx(aurocs[first], abs=1e-4)
    model, _ = load_detector(ckpt / "best")
    again = selection_auroc(model, bench.id_val, bench.ood_val, torch.device("cpu"))
    assert again == pytest.approx(best["selection"]["auroc"], rel=1e-9)
    weights = load_file(str(ckpt / "best.safetensors"))
    epoch = load_file(str(ckpt / f"epoch_{first + 1:03d}.safetensors"))
    assert all(torch.equal(weights[k], epoch[k]) for k in weights)


def ama_argv(run, epochs: int, *extra: str) -> list[str]:
    args = [f"{k}={v}" for k, v in {**TINY_AMA, "critic_steps": 2}.items()]
    return detector_argv("ama", run, args, epochs, *extra)


def test_ama_train_resumes_exactly_and_evaluates(
    capsys, monkeypatch, small_fmnist, tmp_path
) -> None:
    """With the critic of the authors' OOD command: gradient penalty and spectral norm."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sngp = ("--model-arg", "gradient_penalty=10", "--model-arg", "spectral_norm=true")
    assert main(ama_argv(straight, 2, *sngp)) == 0, capsys.readouterr().err
    let_run = interrupt_detector_at_second_epoch(monkeypatch)  # Ctrl-C, then --resume
    assert main(ama_argv(resumed, 2, *sngp)) == 130
    meta = json.loads((resumed / "checkpoints" / "last.json").read_text())
    assert meta["architecture"] == "ama" and meta["recipe"]["beta2"] == 0.9
    assert meta["model_kwargs"]["spectral_norm"] is True
    assert meta["model_kwargs"]["gradient_penalty"] == 10
    let_run()
    assert main(ama_argv(resumed, 2, "--resume", *sngp)) == 0, capsys.readouterr().err
    for name in ("last", "best"):
        a = load_file(str(straight / "checkpoints" / f"{name}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(run) -> list[str]:  # the lines without their timings
        return [line.rsplit("  ", 1)[0] for line in (run / "log.txt").read_text().splitlines()]

    assert log(straight) == log(resumed) and len(log(resumed)) == 2

    out = tmp_path / "eval"
    argv = ["detector", "evaluate", "--from", str(straight / "checkpoints" / "best")]
    code = main([*argv, "--scores", "ama", "--out", str(out), "--device", "cpu", "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert {"metrics.json", "metrics.md", "metrics.csv", "histograms.png"} <= {
        p.name for p in out.iterdir()
    }
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} == {"ama"}
    assert {r["dataset"] for r in rows} >= {"mnist", "noise", "mean"}
    assert all(0 <= r["auroc"] <= 1 for r in rows)
    assert "| ama | mean |" in printed


def test_ama_commands_refuse_bad_input(capsys, small_fmnist, tmp_path) -> None:
    assert main(ama_argv(tmp_path / "r", 1, "--model-arg", "critic_width=0")) == 2
    assert "critic_width takes a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(ama_argv(tmp_path / "r", 1, "--model-arg", "lossy=none")) == 2
    assert "does not accept lossy" in capsys.readouterr().err
    run = tmp_path / "ok"
    assert main(ama_argv(run, 1)) == 0, capsys.readouterr().err
    argv = ["detector", "evaluate", "--from", str(run), "--out", str(tmp_path / "e")]
    assert main([*argv, "--scores", "elbo"]) == 2
    assert "unknown score 'elbo' for a ama detector" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# DiffPath

TINY_DIFFUSION = {"width": 8, "diffusion_steps": 20}


def test_cosine_schedule_by_hand() -> None:
    f = [math.cos((t / 4 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(5)]
    betas = [min(1 - f[t + 1] / f[t], 0.999) for t in range(4)]
    expected = np.cumprod([1 - b for b in betas])
    assert cosine_alphas_cumprod(4).numpy() == pytest.approx(expected, rel=1e-12)
    assert betas[-1] == 0.999  # the clip at the end of the schedule


def test_path_statistics_by_hand() -> None:
    """Two steps of a 1x1 image: eps = (1, 3), so d = (3 - 1) * 2 = 4; a second image
    eps = (-1, 0.5): d = 3."""
    path = torch.tensor([[1.0, -1.0], [3.0, 0.5]]).view(2, 2, 1, 1, 1)
    got = path_statistics(path)
    assert got.tolist() == [
        [4.0, 10.0, 28.0, 4.0, 16.0, 64.0],
        [-0.5, 1.25, -0.875, 3.0, 9.0, 27.0],
    ]


class HalfInput(torch.nn.Module):
    """A stand-in UNet predicting the noise as half its input (whatever the timestep)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


def test_ddim_inversion_follows_the_deterministic_path() -> None:
    model = create_detector("diffusion", 1, 28, **TINY_DIFFUSION)
    model.unet = HalfInput()
    x = torch.rand(2, 1, 28, 28)
    path = model.ddim_inversion(x, 4)
    assert path.shape == (4, 2, 1, 28, 28)
    # An independent walk in float64 (timesteps 0, 5, 10, 15 of 20); bright pixels reach the
    # clip at the last step, where the recorded noise is re-derived from the clipped image.
    ab = [*cosine_alphas_cumprod(20)[[0, 5, 10, 15]].tolist(), 0.0]
    xi, expected, raw = 2 * x[1].double().numpy() - 1, [], []
    for i in range(4):
        raw.append(0.5 * xi)  # the stand-in's prediction
        x0 = np.clip((xi - math.sqrt(1 - ab[i]) * raw[i]) / math.sqrt(ab[i]), -1, 1)
        e = (xi / math.sqrt(ab[i]) - x0) / math.sqrt(1 / ab[i] - 1)
        expected.append(e)
        xi = math.sqrt(ab[i + 1]) * x0 + math.sqrt(1 - ab[i + 1]) * e
    assert (np.abs(expected[-1] - raw[-1]) > 1e-3).any()  # the clip mattered somewhere
    assert path[:, 1].double().numpy() == pytest.approx(np.stack(expected), rel=1e-4, abs=1e-5)


def test_moving_average_updates_by_hand_and_is_what_inverts() -> None:
    """With ema = 0.75 one step leaves the average at 0.75 * initial + 0.25 * stepped weights;
    Adam never steps the average itself, and the inversion reads it, not the trained net."""
    torch.manual_seed(0)
    model = create_detector("diffusion", 1, 28, ema=0.75, **TINY_DIFFUSION).train()
    initial = [p.detach().clone() for p in model.unet.parameters()]
    opt = torch.optim.Adam(model.param_groups(), lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(initial)
    model.train_step(torch.rand(4, 1, 28, 28), opt, 1.0)
    for avg, w, w0 in zip(
        model.ema_unet.parameters(), model.unet.parameters(), initial, strict=True
    ):
        assert torch.allclose(avg, 0.75 * w0 + 0.25 * w, atol=1e-7)
    assert any(
        not torch.equal(w, w0) for w, w0 in zip(model.unet.parameters(), initial, strict=True)
    )
    assert model.options()["ema"] == 0.75 and "ema_unet.out.2.weight" in model.state_dict()
    plain = create_detector("diffusion", 1, 28, **TINY_DIFFUSION)
    plain.unet = HalfInput()
    model.ema_unet = HalfInput()
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.ddim_inversion(x, 4), plain.ddim_inversion(x, 4))
    assert plain.ema_unet is None and plain.denoiser() is plain.unet
    with pytest.raises(UserError, match=r"ema is a rate in \[0, 1\)"):
        create_detector("diffusion", 1, 28, ema=1.0, **TINY_DIFFUSION)
    for bad in (-0.1, "fast"):
        with pytest.raises(UserError, match="option ema takes a finite number >= 0"):
            create_detector("diffusion", 1, 28, ema=bad, **TINY_DIFFUSION)


def test_diffpath_is_the_mixture_log_density_fitted_on_id(tiny_benchmark) -> None:
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(0)
    model = create_detector("diffusion", 1, 28, **TINY_DIFFUSION).eval()
    torch.nn.init.normal_(model.unet.out[-1].weight, 0.0, 0.1)  # not the zero initial output
    score = DiffPath(steps=4, components=2, samples=40, batch_size=16)
    score.fit(model, tiny_benchmark.id_train, torch.device("cpu"))
    train_x, _ = tiny_benchmark.id_train.__getitems__(range(40))
    stats = path_statistics(model.ddim_inversion(train_x, 4)).numpy()
    scaler = StandardScaler().fit(stats)
    gmm = GaussianMixture(2, random_state=0, max_iter=200).fit(scaler.transform(stats))
    x = torch.rand(3, 1, 28, 28)
    expected = gmm.score_samples(scaler.transform(path_statistics(model.ddim_inversion(x, 4))))
    # Batches of 16 and one of 40 differ in float32 rounding only.
    assert score.score_batch(model, x).numpy() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(UserError, match="lower components"):
        DiffPath(components=50, samples=40).fit(model, tiny_benchmark.id_train, "cpu")
    with pytest.raises(UserError, match="not fitted"):
        DiffPath().score_batch(model, x)


def test_diffpath_refuses_bad_parameters() -> None:
    model = create_detector("diffusion", 1, 28, **TINY_DIFFUSION)
    with pytest.raises(UserError, match="unknown covariance 'round'"):
        DiffPath(covariance="round").check(model)
    for steps in (30, 0, 6, "ten"):  # stride 4 gives 5 steps of 20, stride 3 gives 7
        with pytest.raises(UserError, match="cannot be respaced"):
            DiffPath(steps=steps).check(model)
    with pytest.raises(UserError, match="integers >= 1"):
        DiffPath(samples="many").check(model)
    assert model.ddim_timesteps(3).tolist() == [0, 7, 14]
    assert model.ddim_timesteps(7).tolist() == [0, 3, 6, 9, 12, 15, 18]
    with pytest.raises(UserError, match="width a multiple of 8"):
        create_detector("diffusion", 1, 28, width=12)


def test_diffusion_train_and_diffpath_evaluate(capsys, small_fmnist, tmp_path) -> None:
    run, out = tmp_path / "run", tmp_path / "eval"
    argv = ["detector", "train", "--kind", "diffusion", "--epochs", "1", "--batch-size", "32"]
    for k, v in {**TINY_DIFFUSION, "ema": 0.9}.items():
        argv += ["--model-arg", f"{k}={v}"]
    argv += ["--out", str(run), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((run / "checkpoints" / "last.json").read_text())
    assert meta["recipe"]["lr"] == 1e-4 and meta["model_kwargs"]["ema"] == 0.9
    weights = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("ema_unet.") for k in weights)
    assert not (run / "checkpoints" / "best.json").exists()  # no epoch selection for it
    evaluate = ["detector", "evaluate", "--from", str(run), "--out", str(out), "--device", "cpu"]
    assert main([*evaluate, "--scores", "diffpath:covariance=round"]) == 2
    assert "unknown covariance" in capsys.readouterr().err and not out.exists()
    scores = "diffpath:steps=4:components=2:samples=32:batch_size=16"
    assert main([*evaluate, "--scores", scores, "--no-progress"]) == 0, capsys.readouterr().err
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} == {"diffpath"}
    assert all(0 <= r["auroc"] <= 1 for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["scores"]["diffpath"]["components"] == 2
