"""Wrap any classifier (torchvision, timm, your own) into the ``features`` / ``head`` contract.

Post-hoc OOD scores need the penultimate features and the linear head separately (ReAct clips
the features, Mahalanobis fits on them, DICE and ASH reshape the head's input). A classifier
whose last operation is a linear layer already has that split; we only need to cut it there.
:class:`HeadSplit` takes the named ``nn.Linear`` out of the model and puts ``nn.Identity`` in
its place, so the model's own forward now ends at the head's input: no model-specific feature
code, and logits stay bit-identical to the unwrapped model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models.base import Classifier

# torchvision's and timm's ImageNet weights expect inputs normalised with these statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MAX_LISTED = 10


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model``, in module order (a head is usually last)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]


def check_split(model: object) -> None:
    """Refuse, naming the wrapper that fixes it, a model that is not split into features and
    a linear head (a plain torchvision model, an ``nn.Sequential``): the scores need both."""
    if not isinstance(model, nn.Module):
        raise UserError(
            f"the model is a {type(model).__name__}, not a torch.nn.Module; load a checkpoint "
            f"with unleash_ood.load_checkpoint(path)"
        )
    head, features = getattr(model, "head", None), getattr(model, "features", None)
    if isinstance(head, nn.Linear) and callable(features):
        return
    names = linear_layer_names(model)
    raise UserError(
        f"{type(model).__name__} is not split into features and a linear head; wrap it with "
        f"unleash_ood.models.HeadSplit(model, head={names[-1] if names else '...'!r}) "
        f"({describe_linears(model)})"
    )


def describe_linears(model: nn.Module) -> str:
    names = linear_layer_names(model)
    if not names:
        return (
            f"{type(model).__name__} has no nn.Linear layer (a convolutional head, as in "
            "SqueezeNet, cannot be split this way)"
        )
    shown = names[-_MAX_LISTED:]
    more = f" (and {len(names) - len(shown)} earlier)" if len(names) > len(shown) else ""
    return f"its nn.Linear layers are: {', '.join(shown)}{more}"


def _get_linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if module is None:
        raise UserError(
            f"{type(model).__name__} has no module named {name!r}; {describe_linears(model)}"
        )
    if not isinstance(module, nn.Linear):
        raise UserError(
            f"{name!r} in {type(model).__name__} is a {type(module).__name__}, "
            f"not an nn.Linear; {describe_linears(model)}"
        )
    return module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _is_timm_style(model: nn.Module) -> bool:
    return all(callable(getattr(model, m, None)) for m in ("forward_features", "forward_head"))


class HeadSplit(Classifier):
    """A classifier split at its final linear layer ``head`` (a dotted module name).

    ``HeadSplit(torchvision.models.resnet50(), head="fc")``; dotted names reach into
    containers, e.g. ``"classifier.1"`` (EfficientNet) or ``"heads.head"`` (ViT). The wrapped
    model is modified in place (its head becomes ``nn.Identity``): load pretrained weights
    into it *before* wrapping. Models with timm's ``forward_features`` / ``forward_head``
    methods get their features from ``forward_head(..., pre_logits=True)``, timm's own
    definition of the head's input.

    The split is only right if the head is the model's last operation. Giving ``input_size``
    ``(C, H, W)`` checks that once on random input (the model's output must be exactly the
    head's output, and the features exactly its input); without it, each forward still checks
    that the features have shape ``(N, head.in_features)``.

    ``mean`` / ``std`` default to ImageNet's, which torchvision's and timm's weights expect.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: tuple[int, int, int] | None = None,
    ):
        super().__init__(mean, std)
        linear = _get_linear(model, head)
        probe = _Probe(model, linear, input_size) if input_size is not None else None
        _replace(model, head, nn.Identity())
        self.model = model
        self.head = linear
        self.head_name = head
        self.timm_style = _is_timm_style(model)
        if probe is not None:
            probe.check_features(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.timm_style:
            features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        else:
            features = self.model(x)
        return self._check_features(features)

    def exposes_map(self) -> bool:
        return self.timm_style or self._last_pool() is not None

    def features_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and the last feature map: timm's ``forward_features`` output, or else the
        input of the model's last ``nn.AdaptiveAvgPool2d`` (torchvision's ResNets, VGGs,
        EfficientNets, MobileNets, ConvNeXts; not its DenseNets, which pool functionally)."""
        x = self._normalise(x)
        if self.timm_style:
            fmap = self.model.forward_features(x)
            features = self.model.forward_head(fmap, pre_logits=True)
        else:
            pool = self._last_pool()
            if pool is None:
                raise UserError(
                    f"{type(self.model).__name__} has no nn.AdaptiveAvgPool2d, so it does not "
                    "expose its last feature map, which the feature-map scorers (mode) need"
                )
            seen: list[torch.Tensor] = []
            handle = pool.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
            try:
                features = self.model(x)
            finally:
                handle.remove()
            fmap = seen[-1] if seen else None
        if not (isinstance(fmap, torch.Tensor) and fmap.ndim == 4):
            raise UserError(
                f"{type(self.model).__name__} has no (N, C, H, W) feature map before its head "
                "(a transformer's tokens are not one), which the feature-map scorers need"
            )
        return self._check_features(features), fmap

    def features_with_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Only the last map: a wrapped model's inner stages have no common names."""
        features, fmap = self.features_with_map(x)
        return features, [fmap]

    def _last_pool(self) -> nn.Module | None:
        pools = [m for m in self.model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        return pools[-1] if pools else None

    def _check_features(self, features: object) -> torch.Tensor:
        if not (
            isinstance(features, torch.Tensor)
            and features.ndim == 2
            and features.shape[1] == self.head.in_features
        ):
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
            raise UserError(
                f"{type(self.model).__name__} with {self.head_name!r} removed returned {got}, "
                f"not features of shape (N, {self.head.in_features}): {self.head_name!r} is not "
                "the model's last operation (or the model returns auxiliary outputs in training "
                "mode, e.g. torchvision's inception_v3: build it with aux_logits=False)"
            )
        return features


class _Probe:
    """One eval-mode forward of the intact model on random input, recording the head's input
    and output, to check a split before and after the head is removed."""

    def __init__(self, model: nn.Module, head: nn.Linear, input_size: tuple[int, int, int]):
        self.model_name = type(model).__name__
        self.x = torch.randn(2, *input_size, device=head.weight.device, dtype=head.weight.dtype)
        seen: dict[str, torch.Tensor] = {}

        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen["input"], seen["output"] = args[0], output

        handle = head.register_forward_hook(record)
        try:
            output = _eval_forward(model, model, self.x)
        finally:
            handle.remove()
        if not seen:
            raise UserError(f"{self.model_name}'s forward never calls its head")
        if not (isinstance(output, torch.Tensor) and torch.equal(output, seen["output"])):
            raise UserError(
                f"{self.model_name}'s output is not its head's output: the model "
                "does something after the head, so it cannot be split there"
            )
        self.head_input = seen["input"]

    def check_features(self, split: HeadSplit) -> None:
        features = _eval_forward(split.model, split.forward_features, self.x)
        if not torch.equal(features, self.head_input):
            raise UserError(
                f"{self.model_name}'s features with {split.head_name!r} removed "
                "differ from the head's input: the head is not its last operation"
            )


def _eval_forward(module: nn.Module, fn: Callable[[torch.Tensor], object], x: torch.Tensor):
    """``fn(x)`` with ``module`` in eval mode and no autograd, then every submodule's own
    train/eval mode restored (a model may keep, say, frozen BatchNorm layers in eval)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            return fn(x)
    finally:
        for m, training in modes.items():
            m.training = training
