"""The paper's "memorised atypical samples", made visible.

A sample the model fits only through fine detail of its weights loses that fit when a few
percent of the weights are zeroed: its loss rises far more than a typical sample's. The random
masks are the ones the xi estimate uses, so this ranks exactly the samples whose loss the UM
constraint lets rise again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unleash_ood.data.base import ImageData
from unleash_ood.method.constraint import masked_copy, per_sample_losses
from unleash_ood.outputs import forward_outputs
from unleash_ood.report import save_figure
from unleash_ood.rng import torch_generator


@dataclass(frozen=True)
class Atypicality:
    """Per training sample: its loss, the mean loss under random masks, and the prediction."""

    loss: np.ndarray
    masked_loss: np.ndarray
    prediction: np.ndarray

    @property
    def delta(self) -> np.ndarray:
        """How much the masks raise the loss: the atypicality score (higher = more atypical)."""
        return self.masked_loss - self.loss


def atypicality(
    model: torch.nn.Module,
    data: ImageData,
    mask_fraction: float = 0.035,
    n_masks: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = False,
    workers: int = 0,
) -> Atypicality:
    device = torch.device(device)

    def losses(net: torch.nn.Module, label: str) -> torch.Tensor:
        return per_sample_losses(
            net, data, "none", seed, device, batch_size, label if progress else None, workers
        )

    loss = losses(model, "atypical: unmasked model")
    masked = torch.stack(
        [
            losses(
                masked_copy(model, mask_fraction, torch_generator(seed, "random-mask", i)),
                f"atypical: mask {i + 1}/{n_masks}",
            )
            for i in range(n_masks)
        ]
    ).mean(0)
    pred = forward_outputs(model, data, device, batch_size, workers=workers).logits.argmax(1)
    return Atypicality(loss.numpy(), masked.numpy(), pred.numpy())


def ranking_rows(a: Atypicality, labels: np.ndarray) -> list[list]:
    """CSV rows, most atypical first: rank, index, label, prediction, losses, delta."""
    order = np.argsort(-a.delta, kind="stable")
    return [
        [
            rank + 1,
            int(i),
            int(labels[i]),
            int(a.prediction[i]),
            f"{a.loss[i]:.6f}",
            f"{a.masked_loss[i]:.6f}",
            f"{a.delta[i]:.6f}",
        ]
        for rank, i in enumerate(order)
    ]


def plot_grid(
    a: Atypicality, data: ImageData, class_names: tuple[str, ...], path, per_class: int = 8
) -> None:
    """Rows = classes; left block the most atypical samples, right block the most typical."""
    import matplotlib.pyplot as plt

    labels = data.labels.numpy()
    classes = np.unique(labels)
    fig, axes = plt.subplots(
        len(classes),
        2 * per_class + 1,
        squeeze=False,
        figsize=(0.95 * (2 * per_class + 1), 1.05 * len(classes)),
    )
    for row, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        ranked = members[np.argsort(-a.delta[members], kind="stable")]
        picks = [*ranked[:per_class], None, *ranked[::-1][:per_class]]
        for col, i in enumerate(picks):
            ax = axes[row, col]
            ax.axis("off")
            if i is None:
                continue
            image = data.__getitems__([int(i)])[0][0]  # decoded here when streamed
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
            wrong = a.prediction[i] != c
            name = class_names[a.prediction[i]] if class_names else str(a.prediction[i])
            ax.set_title(f"pred {name[:9]}", fontsize=5, color="red" if wrong else "black")
        label = class_names[c] if class_names else str(c)
        axes[row, 0].text(
            -0.15, 0.5, label, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=7
        )
    fig.suptitle(
        "most atypical (left: loss rises most under random weight masks) and most "
        "typical (right) training samples per class; red: misclassified",
        fontsize=8,
    )
    fig.tight_layout()
    save_figure(fig, path)


def precision_at_k(
    a: Atypicality, flipped: np.ndarray, ks: tuple[int, ...] = (100, 500, 1000)
) -> dict[str, float]:
    """How many of the ``k`` most atypical samples carry a flipped label, for each ``k`` (and
    for ``k`` = the number flipped): a direct test of whether random masks find memorised
    samples. Chance is the noise rate, ``len(flipped) / n``."""
    order = np.argsort(-a.delta, kind="stable")
    is_flipped = np.zeros(len(a.delta), dtype=bool)
    is_flipped[flipped] = True
    out = {"chance": float(is_flipped.mean()), "n_flipped": int(is_flipped.sum())}
    for k in sorted({*(k for k in ks if k <= len(order)), int(is_flipped.sum())}):
        if k > 0:
            out[f"precision@{k}"] = float(is_flipped[order[:k]].mean())
    return out
