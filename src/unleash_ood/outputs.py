"""What one forward pass over a dataset leaves behind: features, logits, labels, and the pass
itself (:func:`forward_outputs`), which training, the evaluator and the methods all use.

Every post-hoc scorer that does not need input gradients can be computed from these, so the
evaluator runs each model over each dataset once and hands the same ``Outputs`` to all scorers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from unleash_ood.data.base import ImageData
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.heap import HeapCap, release_freed_memory
from unleash_ood.models.base import Classifier
from unleash_ood.models.maps import MAP_SUMMARIES


@dataclass(frozen=True)
class Outputs:
    """Penultimate features ``(N, D)``, logits ``(N, C)`` and labels ``(N,)``.

    Labels are ``-1`` where a sample has no class (OOD data). Tensors live on the CPU in
    float32 so that scorers see the same numbers whatever device produced them.
    ``summaries`` holds, by name, the bounded per-sample summaries of the last feature map
    (:mod:`unleash_ood.models.maps`) that feature-map scorers asked for; empty otherwise.
    """

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    summaries: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        counts = [self.features.shape[0], self.labels.shape[0]]
        counts += [t.shape[0] for t in self.summaries.values()]
        if any(c != n for c in counts):
            raise ValueError(f"outputs disagree on the sample count: {n} logits, {counts}")

    def summary(self, name: str, scorer: str) -> torch.Tensor:
        """The map summary ``name`` that ``scorer`` reads; a clear error when absent."""
        if name not in self.summaries:
            raise UserError(
                f"{scorer} reads the {name!r} summary of the model's feature map, which these "
                f"outputs lack: compute them with forward_outputs(..., summaries=[{name!r}])"
            )
        return self.summaries[name]

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
    summaries: Sequence[str] = (),
) -> Outputs:
    """Features and logits of ``data`` in eval mode, gathered on the CPU batch by batch.

    Each batch is copied once, straight into float32 CPU tensors allocated for the whole
    dataset at the first batch: no per-batch tensors to concatenate at the end (a second copy
    of every output), and one copy per batch whatever the model's device and dtype.
    ``autocast`` (``torch.bfloat16`` or ``torch.float16``) runs the forward under mixed
    precision; the outputs are float32 all the same. Named ``summaries`` of the feature maps
    (:data:`~unleash_ood.models.maps.MAP_SUMMARIES`) are taken from the same forward pass;
    only they are kept, never the maps.
    """
    if len(data) == 0:
        raise UserError(f"dataset {data.name!r} is empty; nothing to evaluate")
    model.eval()
    device = torch.device(device)
    features = logits = None
    kept: dict[str, torch.Tensor] = {}
    start = 0
    batches = progress_batches(data, batch_size, data.name, progress, workers, device)
    heap = HeapCap()
    for x, _ in batches:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            if summaries:
                feats, stages = model.features_with_stages(to_device(x, device))
                parts = {name: MAP_SUMMARIES[name](stages) for name in summaries}
            else:
                feats, parts = model.features(to_device(x, device)), {}
            out = model.head(feats)
        if features is None:
            features = torch.empty(len(data), feats.shape[1])
            logits = torch.empty(len(data), out.shape[1])
            kept = {name: torch.empty(len(data), *t.shape[1:]) for name, t in parts.items()}
        features[start : start + len(x)].copy_(feats)
        logits[start : start + len(x)].copy_(out)
        for name, t in parts.items():
            kept[name][start : start + len(x)].copy_(t)
        start += len(x)
        heap.step()
    result = Outputs(features, logits, data.labels.clone(), kept)
    result.check_finite(data.name)
    release_freed_memory()
    return result
