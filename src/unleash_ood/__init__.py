"""unleash-ood: out-of-distribution detection for image classifiers.

Built around *Unleashing Mask* (Zhu et al., ICML 2023): post-hoc scores, the UM/UMAP
fine-tuning methods and outlier exposure, with metrics in the field's conventions.

The public face is flat (``from unleash_ood import evaluate, load_benchmark``); each name is
imported on first use, so importing the package (and ``unleash --help``) does not load PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Outputs": "unleash_ood.outputs",
    "ood_metrics": "unleash_ood.metrics",
    "evaluate": "unleash_ood.evaluate",
    "Evaluation": "unleash_ood.evaluate",
    "load_benchmark": "unleash_ood.data",
    "load_checkpoint": "unleash_ood.checkpoint",
    "save_checkpoint": "unleash_ood.checkpoint",
    "create_model": "unleash_ood.models",
    "HeadSplit": "unleash_ood.models",
    "load_model": "unleash_ood.models",
    "Preprocess": "unleash_ood.models",
    "make_scorer": "unleash_ood.scores",
    "Recipe": "unleash_ood.specs",
    "FinetuneSpec": "unleash_ood.specs",
    "OutlierSpec": "unleash_ood.specs",
    "finetune": "unleash_ood.method.finetune",
    "pretrain": "unleash_ood.train",
    "estimate_loss_constraint": "unleash_ood.method.constraint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unleash_ood' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
