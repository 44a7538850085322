"""Built-in architectures and a registry that builds any of them, or a torchvision or timm
model, by name.

Names are stable strings (``cnn``, ``resnet18``, ``wrn40_2``, ``densenet100`` with alias
``densenet_bc_100``, or ``torchvision:<name>`` / ``timm:<name>`` for any torchvision or timm
classifier, split at its last ``nn.Linear`` unless the option ``head`` names it), so a
checkpoint can record its architecture as ``(name, num_classes, in_channels, kwargs)`` and be
rebuilt with :func:`create_model` before its weights are loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from unleash_ood.errors import UserError
from unleash_ood.models.adapter import HeadSplit
from unleash_ood.models.base import Classifier
from unleash_ood.models.cnn import SmallCNN
from unleash_ood.models.densenet import DenseNetBC
from unleash_ood.models.external import (
    TIMM,
    TORCHVISION,
    ExternalModel,
    Preprocess,
    load_model,
    rebuild_own_model,
)
from unleash_ood.models.resnet import ResNet18
from unleash_ood.models.vit import ViT
from unleash_ood.models.wrn import WideResNet
from unleash_ood.options import check_options, option_defaults

__all__ = [
    "MODELS",
    "Classifier",
    "DenseNetBC",
    "ExternalModel",
    "HeadSplit",
    "ModelSpec",
    "Preprocess",
    "ResNet18",
    "SmallCNN",
    "ViT",
    "WideResNet",
    "create_model",
    "load_model",
    "model_names",
]

# Arguments every built-in takes from create_model itself, never through **kwargs.
_COMMON = frozenset({"num_classes", "in_channels", "mean", "std"})


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: its class, a one-line description, and the constructor
    arguments the name pins (``wrn40_2`` is WideResNet with depth 40 and widen factor 2)."""

    build: Callable[..., Classifier]
    description: str
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> list[str]:
        """The keyword arguments :func:`create_model` may pass on for this architecture."""
        return list(option_defaults(self.build, _COMMON | set(self.fixed)))


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(SmallCNN, "small VGG-style CNN for 28x28 images, 0.28M parameters"),
    "resnet18": ModelSpec(
        ResNet18, "ResNet-18 with a CIFAR stem, 11.2M parameters (width=16: 0.7M)"
    ),
    "wrn40_2": ModelSpec(
        WideResNet,
        "WRN-40-2 with dropout 0.3 (Outlier Exposure's CIFAR model), 2.2M parameters",
        {"depth": 40, "widen_factor": 2},
    ),
    "densenet100": ModelSpec(
        DenseNetBC,
        "DenseNet-BC-100, growth 12 (the CIFAR model of ODIN, Energy, Unleashing Mask), 0.77M",
        {"depth": 100},
    ),
    "vit": ModelSpec(
        ViT,
        "small ViT for 28x28/32x32 images (4x4 patches, 6 blocks of width 128), 1.2M "
        "parameters; MOOD's fine-tuned model (unleash detector train --kind mim)",
    ),
}
ALIASES = {"densenet_bc_100": "densenet100"}


def model_names() -> list[str]:
    """Registered architecture names (aliases and ``torchvision:<name>`` also accepted)."""
    return sorted(MODELS)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> Classifier:
    """Build an untrained architecture by name.

    ``mean`` / ``std`` are the per-channel input statistics the model normalises with; they
    default to 0.5 for built-ins and to ImageNet's for torchvision models. ``kwargs`` are
    architecture options, e.g. ``width`` for ``resnet18`` or ``drop_rate`` for ``wrn40_2``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer; got {num_classes!r}")
    if name.startswith((TORCHVISION, TIMM)):
        return rebuild_own_model(name, num_classes, in_channels, mean, std, kwargs)
    spec = MODELS.get(ALIASES.get(name, name))
    if spec is None:
        raise UserError(
            f"unknown model {name!r}; choose one of: {', '.join(model_names())}, "
            f"or {TORCHVISION}<name> / {TIMM}<name> for a torchvision or timm classifier"
        )
    check_options(f"model {name!r}", spec.build, kwargs, skip=_COMMON | set(spec.fixed))
    mean = _channel_stats("mean", mean, in_channels, (0.5,) * in_channels)
    std = _channel_stats("std", std, in_channels, (0.5,) * in_channels)
    try:
        return spec.build(
            num_classes=num_classes,
            in_channels=in_channels,
            mean=mean,
            std=std,
            **spec.fixed,
            **kwargs,
        )
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"model {name!r} cannot be built with options {kwargs} ({e}); check the values"
        ) from e


def _channel_stats(
    what: str, values: Sequence[float] | None, in_channels: int, default: Sequence[float]
) -> tuple[float, ...]:
    values = tuple(float(v) for v in (default if values is None else values))
    if len(values) != in_channels:
        raise UserError(
            f"{what} has {len(values)} values but the model has {in_channels} "
            "input channels; give one per channel"
        )
    return values
