"""Watermarking for OOD detection (Wang, Liu, Zhang, Zhang, Gong, Liu and Han, NeurIPS 2022).

The classifier stays frozen (eval mode). One additive input pattern ``w`` is learned so that
ID images plus ``w`` keep their labels and score as ID while Gaussian noise plus ``w`` scores
as OOD; no real outliers are needed. The loss on an ID batch ``x`` and a noise batch ``z`` of
the same size is ``CE(f(x + w), y) + beta * R``, with, for the score the pattern serves,

* ``msp``: ``R = mean_z [logsumexp f(z + w) - mean_k f_k(z + w)]``, Outlier Exposure's
  cross-entropy to the uniform distribution;
* ``energy``: ``R = mean_z mean_k exp(t_out f_k(z + w)) + mean_x mean_k exp(-t_in f_k(x + w))``,
  their exponential penalties on large outlier logits and small ID logits.

Each step is sharpness-aware and signed: ``g = grad L(w)``, ``e = g / ||g||``, then
``w <- w - alpha * sign(grad L(w + rho e))``; ``alpha`` is divided by 10 for the second half.
The official defaults (QizhouWang/watermarking, train.py): 50 epochs of batch 128 with random
horizontal flips, alpha 0.01, and per score the settings of ``specs.WATERMARK_PRESETS``, which
they give for CIFAR-10 and CIFAR-100; every other benchmark (fmnist among them) takes the
CIFAR-10 ones. ``w``, ``sigma`` and ``rho`` live in
normalised input units, as theirs do (their noise ``sigma * N(0, 1)`` is in normalised units,
i.e. the pixel noise ``mean + std * sigma * N(0, 1)`` here); the saved pattern is converted to
pixel units, what :class:`~unleash_ood.models.watermark.Watermarked` adds to images in [0, 1].

Deviations from the authors' code: their loop runs epochs 0 to 50 inclusive (51 passes) and
divides alpha from pass 25; we run ``epochs`` passes and divide from pass ``ceil(epochs / 2)``
(0-based: 25 of 50, never in a one-pass run; theirs divides at pass 25 whatever the number
of epochs, so below 26 never). Any flag left unset takes its preset value, where theirs drops
every predefined value once one of alpha, sigma, rho or beta is given. The ragged
last batch of an epoch is dropped (as every trainer here does). A zero gradient gives no
sharpness perturbation instead of a division by zero.

``--resume`` continues an interrupted run exactly: the sign steps keep no optimiser state and
epoch ``e`` draws its shuffle, flips and noise from the stream ``(seed, "watermark", e)``, so
the pattern (in the normalised units it is learned in) and the number of completed epochs
are all there is to save. They go into one file, ``checkpoints/watermark_state.safetensors``,
replaced atomically after every epoch, so a crash at any point leaves the last completed
epoch; the settings it must be resumed with are those of ``config.json``, written before the
first epoch. ``checkpoints/final`` is written last and marks a finished run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save, save_file

from unleash_ood.augment import augment
from unleash_ood.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_paths,
    load_checkpoint,
    read_tensors,
    save_checkpoint,
    spec_of,
)
from unleash_ood.data.base import Benchmark, ImageSet
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.method.finetune import with_start_training_data
from unleash_ood.method.losses import oe_loss
from unleash_ood.metrics import accuracy
from unleash_ood.models import Classifier
from unleash_ood.models.watermark import Watermarked
from unleash_ood.outputs import forward_outputs
from unleash_ood.rng import torch_generator
from unleash_ood.rundir import append_log, check_out, check_writable
from unleash_ood.specs import WatermarkSpec
from unleash_ood.train import global_batches


def msp_watermark_loss(
    id_logits: torch.Tensor, y: torch.Tensor, noise_logits: torch.Tensor, beta: float
) -> torch.Tensor:
    """Cross-entropy on the watermarked ID batch plus ``beta`` times OE's uniformity term
    on the watermarked noise."""
    return F.cross_entropy(id_logits, y) + beta * oe_loss(noise_logits)


def energy_watermark_loss(
    id_logits: torch.Tensor,
    y: torch.Tensor,
    noise_logits: torch.Tensor,
    beta: float,
    t_in: float,
    t_out: float,
) -> torch.Tensor:
    """Cross-entropy plus ``beta`` times the exponential penalties on large noise logits
    and small ID logits."""
    e_out = (noise_logits * t_out).exp().mean(1).mean()
    e_in = (-id_logits * t_in).exp().mean(1).mean()
    return F.cross_entropy(id_logits, y) + beta * (e_out + e_in)


def watermark_loss(
    spec: WatermarkSpec, id_logits: torch.Tensor, y: torch.Tensor, noise_logits: torch.Tensor
) -> torch.Tensor:
    if spec.score == "energy":
        return energy_watermark_loss(id_logits, y, noise_logits, spec.beta, spec.t_in, spec.t_out)
    return msp_watermark_loss(id_logits, y, noise_logits, spec.beta)


def sharpness_aware_step(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, alpha: float, rho: float
) -> tuple[torch.Tensor, float]:
    """One signed step of ``w`` against the gradient taken at ``w + rho * g / ||g||``; returns
    the new ``w`` and the loss at the perturbed point."""
    w = w.detach().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(w), w)
    norm = g.norm()
    e = g / norm if norm > 0 else torch.zeros_like(g)
    perturbed = (w + rho * e).detach().requires_grad_()
    loss = loss_fn(perturbed)
    (g,) = torch.autograd.grad(loss, perturbed)
    return (w - alpha * g.sign()).detach(), float(loss.detach())


def check_batch(train: ImageSet, batch_size: int) -> None:
    if len(train) < batch_size:
        raise UserError(
            f"the training set ({len(train)}) is smaller than one batch ({batch_size}); "
            f"lower --batch-size"
        )


def epoch_alpha(spec: WatermarkSpec, epoch: int) -> float:
    """The step size of (0-based) ``epoch``: ``alpha``, divided by 10 for the second half."""
    return spec.alpha * (0.1 if epoch >= (spec.epochs + 1) // 2 else 1.0)


def watermark_epoch(
    model: Classifier,
    train: ImageSet,
    spec: WatermarkSpec,
    w: torch.Tensor,
    epoch: int,
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """One pass of sharpness-aware signed steps over ``train`` from the pattern ``w``
    (normalised units); returns the new pattern and the mean loss."""
    mean, std = model.input_mean, model.input_std
    alpha, losses = epoch_alpha(spec, epoch), []
    g = torch_generator(spec.seed, "watermark", epoch)
    for idx in global_batches(len(train), spec.batch_size, g):
        x, y = train.__getitems__(idx)
        x = augment(x, "flip", g, padding=0)
        noise = torch.randn(x.shape, generator=g)
        x, y, noise = to_device(x, device), y.to(device), to_device(noise, device)
        data = torch.cat([x, mean + std * spec.sigma * noise])
        n = x.shape[0]

        def loss_fn(v: torch.Tensor, data=data, y=y, n=n) -> torch.Tensor:
            logits = model(data + v * std)  # the model normalises: (x - mean)/std + v
            return watermark_loss(spec, logits[:n], y, logits[n:])

        w, loss = sharpness_aware_step(loss_fn, w, alpha, spec.rho)
        losses.append(loss)
    return w, sum(losses) / len(losses)


def learn_watermark(
    model: Classifier,
    train: ImageSet,
    spec: WatermarkSpec,
    device: torch.device,
    log: Callable[[str], None] = print,
    start: tuple[int, torch.Tensor] | None = None,
    on_epoch: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The pattern ``(C, H, W)`` in pixel units learned on ``train`` for frozen ``model``.

    ``start``: the completed epochs and the pattern (normalised units) to continue from;
    ``on_epoch(done, w)`` is called after every epoch (the run saves its state there)."""
    check_batch(train, spec.batch_size)
    model.eval().requires_grad_(False)
    first, w = start or (0, torch.zeros(1, *train.shape))
    w = w.to(device)
    for epoch in range(first, spec.epochs):
        t0 = time.perf_counter()
        w, loss = watermark_epoch(model, train, spec, w, epoch, device)
        if on_epoch is not None:
            on_epoch(epoch + 1, w)
        log(
            f"epoch {epoch + 1:3d}  alpha {epoch_alpha(spec, epoch):.4g}  loss {loss:.4f}  "
            f"{time.perf_counter() - t0:.1f}s"
        )
    return (w * model.input_std)[0].cpu()


def state_path(out: Path) -> Path:
    """The file holding an unfinished run's pattern and completed epochs."""
    return out / "checkpoints" / "watermark_state.safetensors"


def save_state(out: Path, epoch: int, w: torch.Tensor) -> None:
    """Replace the run's state atomically by ``epoch`` completed epochs and pattern ``w``."""
    tensors = {"pattern": w.detach().cpu().contiguous(), "epoch": torch.tensor([epoch])}
    state_path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state_path(out), save(tensors))


def load_state(out: Path, spec: WatermarkSpec, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """The completed epochs and the pattern saved in ``out``, checked (it is untrusted)."""
    tensors = read_tensors(state_path(out))
    epoch, w = tensors.get("epoch"), tensors.get("pattern")
    valid = (
        epoch is not None
        and w is not None
        and epoch.shape == (1,)
        and not epoch.is_floating_point()
        and 0 < int(epoch) <= spec.epochs
        and w.shape == (1, *shape)
        and w.dtype == torch.float32
        and bool(w.isfinite().all())
    )
    if not valid:
        raise UserError(
            f"{state_path(out)} is not the state of this watermark run; remove the folder "
            f"to start afresh"
        )
    return int(epoch), w


def is_finished(out: Path) -> bool:
    return all(p.is_file() for p in checkpoint_paths(out / "checkpoints" / "final"))


def _config(out: Path) -> dict[str, Any]:
    """``out/config.json`` as a dict, or ``{}`` when absent or unreadable."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_watermark_out(out: Path, resume: bool) -> None:
    """Refuse ``--resume`` of a folder without an interrupted run (fresh or finished), and a
    fresh start over an interrupted run or any other results. A folder whose first epoch
    never completed is started afresh."""
    finished, interrupted = is_finished(out), state_path(out).is_file()
    if resume:
        if finished:
            raise UserError(f"{out} holds a finished watermark run; there is nothing to resume")
        if not interrupted:
            raise UserError(
                f"{out} holds no interrupted watermark run; drop --resume to start it afresh"
            )
        check_writable(out)
    elif interrupted and not finished:
        raise UserError(
            f"{out} holds an interrupted watermark run; pass --resume to continue it or "
            f"choose another --out"
        )
    elif not finished and _config(out).get("command") == "watermark":
        check_writable(out)
    else:
        check_out(out)


def plot_pattern(pattern: torch.Tensor, path: Path, title: str) -> None:
    """The pattern as an image (per channel for grey, RGB scaled to [0, 1] for colour)."""
    import matplotlib.pyplot as plt  # optional until a plot is asked for

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    if pattern.shape[0] == 1:
        limit = float(pattern.abs().max()) or 1.0
        im = ax.imshow(pattern[0].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        fig.colorbar(im, ax=ax, fraction=0.046, label="added to pixel value")
    else:
        low, high = float(pattern.min()), float(pattern.max())
        ax.imshow(((pattern - low) / max(high - low, 1e-12)).permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def val_accuracy(model: Classifier, benchmark: Benchmark, device: torch.device) -> float:
    return accuracy(
        forward_outputs(model, benchmark.id_val, device).logits, benchmark.id_val.labels
    )


def run_watermark(
    benchmark: Benchmark,
    start: str | os.PathLike,
    spec: WatermarkSpec,
    out: Path,
    device: torch.device,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Learn a pattern for checkpoint ``start`` on the training data it was trained on (a
    recorded subset or label noise comes along) and write the run directory: ``config.json``,
    ``log.txt``, ``watermark.safetensors`` (the pattern, pixel units), ``watermark.png`` and
    ``checkpoints/final`` (the watermarked model, loadable like any checkpoint). ``resume``
    continues the interrupted run in ``out`` from its last completed epoch."""
    check_watermark_out(out, resume)
    model, meta = load_checkpoint(start, device, benchmark.num_classes, benchmark.image_shape)
    benchmark = with_start_training_data(benchmark, Path(start))  # its subset, if any
    if meta.get("watermark") or meta.get("umap"):
        raise UserError(
            f"{start} is already a watermarked or masked model; watermark the dense model"
        )
    check_batch(benchmark.id_train, spec.batch_size)
    config = {"command": "watermark", "from": str(start), "benchmark": benchmark.name}
    resumed = None
    if resume:
        if _config(out) != {**config, "spec": asdict(spec)}:
            raise UserError(
                f"cannot resume {out}: its settings (config.json) differ from the flags given; "
                f"rerun with the same flags"
            )
        resumed = load_state(out, spec, benchmark.id_train.shape)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**config, "spec": asdict(spec)})
    base_acc = val_accuracy(model, benchmark, device)
    pattern = learn_watermark(
        model,
        benchmark.id_train,
        spec,
        device,
        lambda line: append_log(out, line, echo=progress),
        start=resumed,
        on_epoch=lambda done, w: save_state(out, done, w),
    )
    tmp = out / f".watermark.safetensors.tmp{os.getpid()}"
    save_file({"pattern": pattern.contiguous()}, str(tmp), metadata={"score": spec.score})
    os.replace(tmp, out / "watermark.safetensors")
    marked = Watermarked(model, pattern.to(device)).eval()
    acc = val_accuracy(marked, benchmark, device)
    append_log(out, f"ID validation accuracy {100 * base_acc:.2f} -> {100 * acc:.2f} watermarked")
    title = f"{spec.score} watermark, |w| max {float(pattern.abs().max()):.3f}"
    plot_pattern(pattern, out / "watermark.png", title)
    final = out / "checkpoints" / "final"  # written last: it marks the run finished
    save_checkpoint(
        final,
        marked,
        spec_of(meta),
        watermark={**config, **asdict(spec)},
        benchmark=benchmark.name,
        metrics={"val_acc": acc, "val_acc_unmarked": base_acc},
        **({"train_data": meta["train_data"]} if "train_data" in meta else {}),
    )
    return final
