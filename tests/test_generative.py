"""Generative detectors: each score on hand-computed cases, exact resume, and the commands."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import detector_argv, interrupt_detector_at_second_epoch
from unleash_ood.checkpoint import model_spec, save_checkpoint
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.generative import create_detector, parse_detector_scores
from unleash_ood.generative.error_reduction import ErrorReduction, lossy_error, png_bits
from unleash_ood.generative.score_test import (
    ScoreTest,
    blocks,
    fisher_cholesky,
    per_sample_gradients,
    statistic,
)
from unleash_ood.generative.vae import ELBO, VAE, lossy_input
from unleash_ood.models import create_model

TINY_VAE = {"width": 2, "latent": 3}


def constant_vae(mu: list[float], logvar: list[float], level_logits: torch.Tensor) -> VAE:
    """A VAE whose posterior is N(mu, exp(logvar)) for every input and whose decoder gives
    every pixel the logits ``level_logits`` (256 values): all weights zero, biases set."""
    model = create_detector("vae", 1, 28, **TINY_VAE)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.to_mu.bias.copy_(torch.tensor(mu))
        model.to_logvar.bias.copy_(torch.tensor(logvar))
        model.out.bias.copy_(level_logits)
    return model.eval()


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g).float() / 255


def test_negative_elbo_matches_a_hand_computation() -> None:
    mu, logvar = [0.5, -1.0, 2.0], [0.0, -0.5, 0.3]
    logits = torch.linspace(-2, 2, 256)
    model = constant_vae(mu, logvar, logits)
    x = random_images(2)
    values = (x * 255).round().long().flatten(1).numpy()
    log_norm = math.log(sum(math.exp(v) for v in logits.tolist()))
    rec = [sum(log_norm - logits[v].item() for v in row) for row in values]
    kl = 0.5 * sum(m * m + math.exp(lv) - 1 - lv for m, lv in zip(mu, logvar, strict=True))
    assert model(x).tolist() == pytest.approx([r + kl for r in rec], rel=1e-5)
    # The training loss draws latents, but this decoder ignores them: the same value, averaged.
    loss, parts = model.loss(x)
    assert loss.item() == pytest.approx(sum(rec) / 2 + kl, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)


def test_lossy_input_is_nearest_downsampling_by_four() -> None:
    x = random_images(1)
    lossy = lossy_input(x, "downsample")
    i = torch.arange(28)
    expected = x[0, 0][(i // 4 * 4)[:, None], (i // 4 * 4)[None, :]]
    assert torch.equal(lossy[0, 0], expected)
    assert torch.equal(lossy_input(x, "none"), x)


def test_error_reduction_by_hand() -> None:
    """Every pixel's restoration has logits 5 at value 200 and 0 elsewhere; the lossy image as
    one-hot logits costs log(e + 255) per pixel, minus 1 where it kept the value."""
    logits = torch.zeros(256)
    logits[200] = 5.0
    model = constant_vae([0.0] * 3, [0.0] * 3, logits)
    busy = torch.full((1, 1, 28, 28), 200 / 255)
    busy[..., ::4, ::4] = 0  # the pixels downsampling keeps: the lossy image is all 0
    flat = torch.full((1, 1, 28, 28), 100 / 255)  # downsampling changes nothing
    x = torch.cat([busy, flat])
    lossy = lossy_input(x, "downsample")
    kept = [49, 784]
    log_norm = math.log(math.exp(5) + 255)
    restored = [735 * (log_norm - 5) + 49 * log_norm, 784 * log_norm]
    e = [784 * math.log(math.e + 255) - k - r for k, r in zip(kept, restored, strict=True)]
    assert e[0] > 0 > e[1]
    assert lossy_error(x, lossy).tolist() == pytest.approx(
        [784 * math.log(math.e + 255) - k for k in kept]
    )

    def bits(img: torch.Tensor) -> int:
        buf = io.BytesIO()
        array = img[0].mul(255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(buf, format="PNG", compress_level=9)
        return 8 * len(buf.getvalue())

    complexity = bits(x[0]) - bits(lossy[0])
    scores = ErrorReduction(lam=0.5).score_batch(model, x)
    # Positive reduction: the complexity correction is added; negative: it is not.
    assert scores.tolist() == pytest.approx([e[0] + 0.5 * complexity, e[1]], rel=1e-6)


def test_png_bits_measure_complexity() -> None:
    flat = torch.full((1, 1, 28, 28), 7, dtype=torch.uint8)
    noisy = (random_images(1) * 255).to(torch.uint8)
    b_flat, b_noisy = png_bits(torch.cat([flat, noisy])).tolist()
    assert b_flat % 8 == 0 and b_flat < b_noisy
    # Grey and RGB images both encode; the encoding holds the image.
    rgb = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    assert png_bits(rgb).item() > 0
    buf = io.BytesIO()
    Image.fromarray(noisy[0, 0].numpy()).save(buf, format="PNG", compress_level=9)
    assert np.array_equal(np.asarray(Image.open(buf)), noisy[0, 0].numpy())


def test_score_statistic_on_two_parameters() -> None:
    """One block of two parameters: g^T F^-1 g / (2 sqrt(1 * 2 * 2)) with
    F = (1e-3 I + sum g_i g_i^T) / n, computed with NumPy."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 2)) * [1.0, 0.1]
    test = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, -0.2]])
    gram = torch.from_numpy(train.T @ train)[None]
    chol = fisher_cholesky(gram, len(train))
    fisher = (1e-3 * np.eye(2) + train.T @ train) / len(train)
    expected = np.einsum("ni,ij,nj->n", test, np.linalg.inv(fisher), test) / 4
    got = statistic(torch.from_numpy(test)[:, None, :], chol)
    assert got.numpy() == pytest.approx(expected, rel=1e-10)
    # The rare direction (small training gradients) weighs far more.
    assert got[1] > 50 * got[0]


def test_blocks_cut_each_output_row() -> None:
    g = torch.arange(3 * 4).reshape(1, 3, 2, 2).float().repeat(2, 1, 1, 1)
    b = blocks(g, 2)
    assert b.shape == (2, 6, 2)
    assert b[0, 2].tolist() == [4.0, 5.0] and b[0, 3].tolist() == [6.0, 7.0]


def test_per_sample_gradients_match_one_backward_per_image() -> None:
    torch.manual_seed(0)
    model = create_detector("vae", 1, 28, **TINY_VAE).eval()
    x = random_images(3)
    names = ["out.weight", "to_mu.bias"]
    batched = per_sample_gradients(model, x, names)
    for i in range(3):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        for n in names:
            p = dict(model.named_parameters())[n]
            assert torch.allclose(batched[n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_score_test_fits_and_scores_minus_the_statistic(tiny_benchmark) -> None:
    torch.manual_seed(0)
    model = create_detector("vae", 1, 28, lossy="none", **TINY_VAE).eval()
    score = ScoreTest(layers="to_mu.weight", samples=40, splits=1, batch_size=16)
    score.fit(model, tiny_benchmark.id_train, torch.device("cpu"))
    x = random_images(4)
    g = per_sample_gradients(model, x, ["to_mu.weight"])["to_mu.weight"]
    train_x, _ = tiny_benchmark.id_train.__getitems__(range(40))
    gt = per_sample_gradients(model, train_x, ["to_mu.weight"])["to_mu.weight"].double()
    g = g.double()
    expected = torch.zeros(4, dtype=torch.float64)
    for row in range(3):  # one block per output unit's row (splits=1) of 6 weights
        fisher = (1e-3 * torch.eye(6, dtype=torch.float64) + gt[:, row].T @ gt[:, row]) / 40
        expected += torch.stack([gi[row] @ torch.linalg.inv(fisher) @ gi[row] for gi in g])
    expected /= 2 * math.sqrt(3 * 6 * 6)
    assert score.score_batch(model, x).tolist() == pytest.approx((-expected).tolist(), rel=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown score 'nope' for a vae detector"),
        ("elbo,elbo", "given twice"),
        ("error_reduction:lam", "key=value"),
        ("error_reduction:gamma=1", "does not take gamma"),
    ],
)
def test_bad_score_lists_fail_with_a_hint(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_detector_scores(spec, "vae")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("score_test:samples=many", "score_test's samples must be an integer >= 2"),
        ("score_test:splits=x", "score_test's splits and batch_size must be integers >= 1"),
        ("score_test:layers=5", "layers are parameter names joined by"),
        ("score_test_ekfac:layers=5", "layers are module names joined by"),
        ("score_test_ekfac:samples=1.5", "samples must be an integer >= 2"),
        ("score_test_ekfac:batch_size=true", "batch_size must be an integer >= 1"),
        ("error_reduction:lam=abc", "lam is a number; got 'abc'"),
    ],
)
def test_score_parameters_of_the_wrong_type_fail_with_a_hint(spec: str, message: str) -> None:
    """Parameters come from the command line as text, numbers or booleans: each score checks
    them before any work, with one line that says what it expects."""
    (score,) = parse_detector_scores(spec, "vae")
    lossy = "downsample" if spec.startswith("error_reduction") else "none"
    with pytest.raises(UserError, match=message):
        score.check(create_detector("vae", 1, 28, lossy=lossy, **TINY_VAE))


def test_score_checks_refuse_what_the_model_cannot_give() -> None:
    plain = create_detector("vae", 1, 28, lossy="none", **TINY_VAE)
    with pytest.raises(UserError, match="lossy=downsample"):
        ErrorReduction().check(plain)
    with pytest.raises(UserError, match=r"no parameter 'head\.weight'"):
        ScoreTest(layers="head.weight").check(plain)
    with pytest.raises(UserError, match="do not split into 3 blocks"):
        ScoreTest(splits=3).check(plain)
    restoring = create_detector("vae", 1, 28, **TINY_VAE)  # lossy=downsample
    for score in (ScoreTest(), ELBO()):
        with pytest.raises(UserError, match=r"needs a plain VAE.*--model-arg lossy=none"):
            score.check(restoring)


def train_argv(run, epochs: int, *extra: str) -> list[str]:
    return detector_argv("vae", run, ["width=2", "latent=4"], epochs, *extra)


def test_detector_train_resumes_exactly_and_evaluates(
    capsys, monkeypatch, small_fmnist, tmp_path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_argv(straight, 2)) == 0, capsys.readouterr().err
    let_run = interrupt_detector_at_second_epoch(monkeypatch)  # Ctrl-C, then --resume
    assert main(train_argv(resumed, 2)) == 130
    meta = json.loads((resumed / "checkpoints" / "last.json").read_text())
    assert meta["epoch"] == 1 and meta["detector"] and meta["recipe"]["lr"] == 3e-4
    let_run()
    assert main(train_argv(resumed, 2, "--resume")) == 0, capsys.readouterr().err
    a = load_file(str(straight / "checkpoints" / "last.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((resumed / "log.txt").read_text().splitlines()) == 2
    assert main(train_argv(straight, 2)) == 2
    assert "already holds a training run" in capsys.readouterr().err

    def evaluate(run: Path, scores: str) -> tuple[int, str, list[dict]]:
        out = run / "eval"
        argv = ["detector", "evaluate", "--from", str(run), "--scores", scores]
        code = main([*argv, "--splits", "test", "--out", str(out), "--device", "cpu"])
        printed, err = capsys.readouterr()
        rows = json.loads((out / "metrics.json").read_text())["rows"] if code == 0 else []
        return code, printed + err, rows

    code, printed, rows = evaluate(straight, "all")  # a restoring VAE's: error_reduction
    assert code == 0, printed
    assert {"metrics.json", "metrics.md", "metrics.csv", "histograms.png", "config.json"} <= {
        p.name for p in (straight / "eval").iterdir()
    }
    assert {r["scorer"] for r in rows} == {"error_reduction"}
    assert {r["dataset"] for r in rows} >= {"mnist", "letters", "noise", "mean"}
    assert "| error_reduction | mean |" in printed
    config = json.loads((straight / "eval" / "config.json").read_text())
    assert config["scores"]["error_reduction"] == {"lam": 1.0}
    # the likelihood scores need a plain VAE: refused on the restoring one, before any work
    assert evaluate(resumed, "elbo")[0] == 2 and not (resumed / "eval").exists()
    plain = tmp_path / "plain"
    assert main(train_argv(plain, 1, "--model-arg", "lossy=none")) == 0
    scores = "elbo,score_test:samples=32:splits=2:batch_size=32,score_test_ekfac:samples=32"
    code, printed, rows = evaluate(plain, scores)
    assert code == 0, printed
    assert {r["scorer"] for r in rows} == {"elbo", "score_test", "score_test_ekfac"}
    assert all(0 <= r["auroc"] <= 1 for r in rows)
    # trained on a benchmark file, recorded by name only: the file must be named again
    of_file = tmp_path / "of_file"
    shutil.copytree(plain / "checkpoints", of_file / "checkpoints")
    sidecar = of_file / "checkpoints" / "last.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "benchmark": "mine"}))
    code, printed, _ = evaluate(of_file, "elbo")
    assert code == 2 and "trained on benchmark 'mine', which is no built-in suite" in printed
    assert not (of_file / "eval").exists()


def test_detector_commands_refuse_bad_input(
    capsys, tiny_checkpoint, small_fmnist, tmp_path
) -> None:
    assert main(train_argv(tmp_path / "r", 1, "--nesterov")) == 2
    assert "Adam has no Nesterov" in capsys.readouterr().err
    assert main(train_argv(tmp_path / "r", 1, "--model-arg", "lossy=blur")) == 2
    assert "unknown lossy operation 'blur'" in capsys.readouterr().err
    for arg, message in (
        ("width=0", "option width takes a positive integer (default 32), not 0"),
        ("width=abc", "option width takes a positive integer (default 32), not 'abc'"),
        ("beta=-1", "option beta takes a finite number >= 0 (default 1.0), not -1"),
        ("beta=true", "option beta takes a finite number >= 0 (default 1.0), not True"),
        ("depth=2", "does not accept depth; its options are: width=32, latent=100"),
    ):
        assert main(train_argv(tmp_path / "r", 1, "--model-arg", arg)) == 2
        assert message in capsys.readouterr().err
    for flags, message in (
        (["--beta2", "1"], "--beta2 is one of Adam's betas: it must lie in [0, 1), not 1.0"),
        (["--grad-clip", "nan"], "--grad-clip must be >= 0 (0: off), not nan"),
    ):
        assert main(train_argv(tmp_path / "r", 1, *flags)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    classifier = tmp_path / "cnn"
    model = create_model("cnn", num_classes=10, in_channels=1, width=2)
    save_checkpoint(classifier, model, model_spec(model, "cnn", 28, {"width": 2}))
    argv = ["detector", "evaluate", "--from", str(classifier), "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    assert "unknown score" not in (err := capsys.readouterr().err) and "classifier" in err
    assert not (tmp_path / "e").exists()
