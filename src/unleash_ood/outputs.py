"""What one forward pass over a dataset leaves behind: features, logits, labels, and the pass
itself (:func:`forward_outputs`), which training, the evaluator and the methods all use.

Every post-hoc scorer that does not need input gradients can be computed from these, so the
evaluator runs each model over each dataset once and hands the same ``Outputs`` to all scorers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unleash_ood.data.base import ImageData
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.models.base import Classifier


@dataclass(frozen=True)
class Outputs:
    """Penultimate features ``(N, D)``, logits ``(N, C)`` and labels ``(N,)``.

    Labels are ``-1`` where a sample has no class (OOD data). Tensors live on the CPU in
    float32 so that scorers see the same numbers whatever device produced them.
    """

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        if self.features.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(
                f"features, logits and labels disagree on the sample count: "
                f"{self.features.shape[0]}, {n}, {self.labels.shape[0]}"
            )

    def __len__(self) -> int:
        return self.logits.shape[0]

    def check_finite(self, what: str) -> None:
        """Refuse NaN/inf logits: every score and metric downstream would be meaningless."""
        if not torch.isfinite(self.logits).all():
            bad = int((~torch.isfinite(self.logits)).any(dim=1).sum())
            raise UserError(
                f"{what}: the model produced NaN or infinite logits for {bad} of {len(self)} "
                f"samples; check the checkpoint and the input normalisation"
            )


def progress_batches(
    data: ImageData,
    batch_size: int,
    desc: str,
    progress: bool,
    workers: int = 0,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``data.batches(batch_size)`` behind a progress bar when ``progress``; streamed data is
    decoded in ``workers`` processes, into pinned memory when ``device`` is a GPU (the copies
    of :func:`~unleash_ood.device.to_device` are non-blocking)."""
    pin = device is not None and device.type == "cuda"
    batches = data.batches(batch_size, workers=workers, pin_memory=pin)
    if not progress:
        return batches
    return tqdm(batches, total=-(-len(data) // batch_size), desc=desc, leave=False)


@torch.inference_mode()
def forward_outputs(
    model: Classifier,
    data: ImageData,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = False,
    autocast: torch.dtype | None = None,
    workers: int = 0,
) -> Outputs:
    """Features and logits of ``data`` in eval mode, gathered on the CPU batch by batch.

    Each batch is copied once, straight into float32 CPU tensors allocated for the whole
    dataset at the first batch: no per-batch tensors to concatenate at the end (a second copy
    of every output), and one copy per batch whatever the model's device and dtype.
    ``autocast`` (``torch.bfloat16`` or ``torch.float16``) runs the forward under mixed
    precision; the outputs are float32 all the same.
    """
    if len(data) == 0:
        raise UserError(f"dataset {data.name!r} is empty; nothing to evaluate")
    model.eval()
    device = torch.device(device)
    features = logits = None
    start = 0
    for x, _ in progress_batches(data, batch_size, data.name, progress, workers, device):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            feats = model.features(to_device(x, device))
            out = model.head(feats)
        if features is None:
            features = torch.empty(len(data), feats.shape[1])
            logits = torch.empty(len(data), out.shape[1])
        features[start : start + len(x)].copy_(feats)
        logits[start : start + len(x)].copy_(out)
        start += len(x)
    result = Outputs(features, logits, data.labels.clone())
    result.check_finite(data.name)
    return result
