"""Your own classifier: a torchvision or timm architecture by name, its weights from a file.

``load_model("torchvision:resnet50", "resnet50.pth", num_classes=10, input_shape=(3, 32, 32))``
builds the architecture, reads a state dict without unpickling anything, splits the model at
its head (:class:`~unleash_ood.models.adapter.HeadSplit`) and checks, before any evaluation
work, that it fits the data: the head's class count (or an explicit class map), the image
channels, and one dummy forward at the data's resolution, so a mismatch is a one-line error
and never a run that ends with ID accuracy 0.

Preprocessing is the model's, stated by the caller: images in [0, 1] are resized (shorter
side), centre-cropped and normalised with ImageNet's mean and std (timm: the model's own
``pretrained_cfg`` statistics), as torchvision's and timm's evaluation transforms do. A
weights file does not say what pipeline it was trained with, so the sizes are never guessed:
without ``resize``/``crop`` the model sees the data at its own resolution.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models.adapter import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HeadSplit,
    describe_linears,
    linear_layer_names,
)
from unleash_ood.models.base import load_fitting_state

TORCHVISION = "torchvision:"
TIMM = "timm:"
RANDOM_WEIGHTS = "none"
# Random weights are drawn from this seed, so every process of a torchrun job (and every run)
# builds the same model.
RANDOM_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")

# These torchvision nets return auxiliary logits in training mode unless told not to; the
# auxiliary heads only help train them from scratch on ImageNet and would break the split.
# ``init_weights=True`` pins their current initialisation and silences a FutureWarning.
_TORCHVISION_AUX = frozenset({"googlenet", "inception_v3"})


def torchvision_classifier(arch: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None)``, with ``num_classes`` outputs
    (default: the architecture's own, 1000 for ImageNet models)."""
    import torchvision  # deferred: only this path needs it, and it is slow to import

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise UserError(
            f"unknown torchvision classifier {arch!r}; choose one of: {', '.join(available)}"
        )
    if arch in _TORCHVISION_AUX:
        kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{TORCHVISION}{arch} rejected its arguments: {e}") from e


def _timm_classifier(arch: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    try:
        import timm  # an optional extra
    except ImportError as e:
        raise UserError(f"{TIMM}{arch} needs timm, which is not installed: pip install timm") from e
    if arch not in timm.list_models():
        raise UserError(f"unknown timm model {arch!r}; see timm.list_models() for the names")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{TIMM}{arch} rejected its arguments: {e}") from e


def _builder(spec: str, **kwargs: Any) -> Callable[[int | None], nn.Module]:
    """The architecture ``spec`` names, as a function of its class count; ``kwargs`` go to
    its constructor."""
    for prefix, build in ((TORCHVISION, torchvision_classifier), (TIMM, _timm_classifier)):
        if spec.startswith(prefix) and spec.removeprefix(prefix):
            arch = spec.removeprefix(prefix)
            return lambda k: build(arch, k, **kwargs)
    raise UserError(
        f"--model {spec!r}: give {TORCHVISION}NAME or {TIMM}NAME (e.g. torchvision:resnet50)"
    )


@dataclass(frozen=True)
class Preprocess:
    """The model's own input pipeline on images in [0, 1], before normalisation.

    ``resize``: the shorter side becomes this many pixels (antialiased bilinear, the long side
    scaled alike, as torchvision's ``Resize(int)``); ``crop``: the centre ``crop`` x ``crop``
    square (torchvision's ``CenterCrop`` rounding); ``gray_to_rgb``: a 1-channel image's
    channel repeated three times, for RGB models on grey data.
    """

    resize: int | None = None
    crop: int | None = None
    gray_to_rgb: bool = False

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a positive number of pixels; got {value!r}")

    def _resized(self, h: int, w: int) -> tuple[int, int]:
        if self.resize is None:
            return h, w
        short, long = min(h, w), max(h, w)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if h <= w else (new_long, self.resize)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` images of ``shape`` have after the pipeline."""
        c, h, w = shape
        c = 3 if self.gray_to_rgb and c == 1 else c
        h, w = self._resized(h, w)
        if self.crop is not None:
            if self.crop > min(h, w):
                raise UserError(
                    f"crop {self.crop} is larger than the {h}x{w} images it would cut from; "
                    f"resize them to at least {self.crop} first (--resize)"
                )
            h = w = self.crop
        return c, h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gray_to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        size = self._resized(h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            h, w = size
        if self.crop is not None:
            top, left = round((h - self.crop) / 2), round((w - self.crop) / 2)
            x = x[..., top : top + self.crop, left : left + self.crop]
        return x


class ExternalModel(HeadSplit):
    """A :class:`HeadSplit` that applies its model's own :class:`Preprocess` to images in
    [0, 1] before normalising them; ``source`` records how it was built (for run configs)."""

    def __init__(
        self,
        model: nn.Module,
        head: str,
        preprocess: Preprocess,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: tuple[int, int, int] | None = None,
    ):
        super().__init__(model, head, mean, std, input_size)
        self.preprocess = preprocess
        self.source: dict[str, Any] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return super().features(self.preprocess(x))

    @property
    def in_channels(self) -> int:
        return 1 if self.preprocess.gray_to_rgb else super().in_channels


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from ``.safetensors``, or from a ``.pth``/``.pt`` file that
    ``torch.load(weights_only=True)`` can read (a plain state dict, or one under a
    ``"state_dict"`` key); nothing is ever unpickled."""
    if str(path).startswith((TORCHVISION, TIMM)):
        raise UserError(
            f"--weights {path}: named pretrained weights would be downloaded, which this "
            "library never does; download the file once and give its path (torchvision's "
            "weights enum lists the URL, and its transforms() the --resize/--crop to use)"
        )
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(
            f"--weights {path}: expected a {', '.join(WEIGHT_SUFFIXES)} file, "
            f"or {RANDOM_WEIGHTS} for random weights"
        )
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} cannot be read as a state dict without unpickling code ({first}); "
            "save torch.save(model.state_dict(), ...) or a .safetensors file"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def read_class_map(
    source: str | Path | Mapping[Any, Any], num_classes: int | None, outputs: int
) -> list[int]:
    """The model output index of each benchmark class, from a JSON object
    ``{"<benchmark class index>": <model output index>, ...}`` (a file, or the mapping itself).

    Every benchmark class ``0..num_classes-1`` (default: as many as the map has keys) must be
    mapped, each to its own output in ``0..outputs-1``.
    """
    where = "the class map"
    if not isinstance(source, Mapping):
        where = f"--class-map {source}"
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{where} is not a readable JSON file ({e})") from e
    if not isinstance(source, Mapping):
        raise UserError(
            f"{where} holds a JSON {type(source).__name__}; expected an object "
            '{"<benchmark class>": <model output>, ...}'
        )
    pairs = {}
    for key, value in source.items():
        try:
            index = int(key)
        except ValueError:
            raise UserError(f"{where}: key {key!r} is not a class index") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < outputs:
            raise UserError(
                f"{where}: class {key} maps to {value!r}, not a model output in 0..{outputs - 1}"
            )
        pairs[index] = value
    num_classes = len(pairs) if num_classes is None else num_classes
    missing = sorted(set(range(num_classes)) - set(pairs))
    extra = sorted(set(pairs) - set(range(num_classes)))
    if missing or extra:
        wrong = f"missing {missing[:5]}" if missing else f"not classes of the benchmark {extra[:5]}"
        raise UserError(f"{where} must map each benchmark class 0..{num_classes - 1} once; {wrong}")
    mapped = [pairs[c] for c in range(num_classes)]
    if len(set(mapped)) != len(mapped):
        raise UserError(f"{where} maps two benchmark classes to the same model output")
    return mapped


def restricted_head(head: nn.Linear, outputs: Sequence[int]) -> nn.Linear:
    """A copy of ``head`` keeping only the rows ``outputs``, in that order."""
    index = torch.as_tensor(outputs, dtype=torch.int64, device=head.weight.device)
    new = nn.Linear(head.in_features, len(outputs), bias=head.bias is not None)
    new = new.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight[index])
        if head.bias is not None:
            new.bias.copy_(head.bias[index])
    return new


def _linear_or_none(net: nn.Module, name: str) -> nn.Linear | None:
    """The ``nn.Linear`` called ``name``; None if there is none (HeadSplit then says why)."""
    module = dict(net.named_modules()).get(name) if name else None
    return module if isinstance(module, nn.Linear) else None


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _build(
    spec: str, weights: str | Path, num_classes: int | None, head: str | None
) -> tuple[nn.Module, str]:
    """The architecture with its weights loaded, and the name of its head."""
    build = _builder(spec)
    if str(weights) == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            net = build(num_classes)
        return net, head or _auto_head(net, spec)
    state = read_state_dict(weights)
    net = build(None)
    head = head or _auto_head(net, spec)
    head_weight = state.get(f"{head}.weight")
    if head_weight is not None and head_weight.ndim == 2:
        current = _linear_or_none(net, head)
        if current is not None and head_weight.shape[0] != current.out_features:
            net = build(head_weight.shape[0])  # a fine-tuned head: rebuild at its class count
    load_fitting_state(
        net, state, Path(weights).name, spec, "give a state dict of this architecture"
    )
    return net, head


def _auto_head(net: nn.Module, spec: str) -> str:
    names = linear_layer_names(net)
    if not names:
        raise UserError(
            f"{spec} cannot be split into features and a linear head: {describe_linears(net)}"
        )
    return names[-1]


def load_model(
    spec: str,
    weights: str | Path,
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    head: str | None = None,
    class_map: str | Path | Mapping[Any, Any] | None = None,
    preprocess: Preprocess | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ExternalModel:
    """Your own classifier ``spec`` (``torchvision:NAME`` or ``timm:NAME``) with ``weights``
    (a ``.safetensors`` or ``.pth`` state dict, or ``"none"``: random weights from a fixed
    seed, with ``num_classes`` outputs), checked against the data it will see.

    ``num_classes``: the benchmark's class count; the head must predict exactly these classes,
    unless ``class_map`` (see :func:`read_class_map`) names the output of each, when the head
    keeps only those outputs, in the benchmark's order. ``input_shape``: the data's
    ``(C, H, W)``; the model's first convolution must take its channels (``preprocess`` may
    repeat a grey channel) and one forward must run at its size after ``preprocess``. The head
    is the model's last ``nn.Linear`` unless ``head`` names it; either way it must be the
    model's last operation. ``mean``/``std`` default to ImageNet's (timm: the model's own).
    """
    preprocess = preprocess or Preprocess()
    random_weights = str(weights) == RANDOM_WEIGHTS
    net, head_name = _build(spec, weights, num_classes if random_weights else None, head)
    linear = _linear_or_none(net, head_name)
    outputs = linear.out_features if linear is not None else None
    mapped = None
    if class_map is not None and outputs is not None:
        mapped = read_class_map(class_map, num_classes, outputs)
    elif num_classes is not None and outputs is not None and outputs != num_classes:
        raise UserError(
            f"{spec}'s head {head_name!r} predicts {outputs} classes but the benchmark has "
            f"{num_classes}; give --class-map FILE (JSON {{benchmark class: model output}}) "
            "or weights trained on this benchmark"
        )
    mean, std = _input_stats(net, mean, std)
    probe = _check_input(net, spec, input_shape, preprocess, len(mean))
    try:
        model = ExternalModel(net, head_name, preprocess, mean, std, input_size=probe)
    except UserError as e:
        if head is not None:
            raise
        raise UserError(f"{e}; name the head with --head ({describe_linears(net)})") from e
    except (RuntimeError, AssertionError, ValueError) as e:
        raise _input_size_error(spec, input_shape, preprocess, e) from e
    if mapped is not None:
        model.head = restricted_head(model.head, mapped)
    model.source = {
        "model": spec,
        "weights": str(weights),
        "head": head_name,
        "class_map": mapped,
        **asdict(preprocess),
    }
    return model.eval()


# The options of an own model's checkpoint that are not its constructor's: where its head is
# and its preprocessing (what load_model was given besides the weights).
OWN_OPTIONS = ("head", "resize", "crop", "gray_to_rgb")


def own_model_options(model: ExternalModel) -> dict[str, Any]:
    """What a checkpoint of ``model`` records to rebuild it (:func:`rebuild_own_model`): its
    head's name and its preprocessing. A class map needs no record: the head it cut down is
    saved with the weights, and is rebuilt at its class count."""
    return {"head": model.head_name, **asdict(model.preprocess)}


def rebuild_own_model(
    spec: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    options: Mapping[str, Any],
) -> ExternalModel:
    """The untrained :class:`ExternalModel` of a checkpoint of your own model, to load its
    weights into: ``spec`` at ``num_classes`` outputs, split at ``options["head"]`` (default:
    its last ``nn.Linear``), with the preprocessing ``options`` record; the other options go to
    the architecture's constructor. ``in_channels`` is the data's: 1 with ``gray_to_rgb``."""
    ctor = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
    preprocess = Preprocess(
        options.get("resize"), options.get("crop"), options.get("gray_to_rgb", False) is True
    )
    takes = 1 if preprocess.gray_to_rgb else 3
    if in_channels != takes:
        raise UserError(
            f"{spec} takes 3-channel input; got in_channels={in_channels} (1 needs "
            "gray_to_rgb=True)"
        )
    net = _builder(spec, **ctor)(num_classes)
    head = options.get("head")
    if head is None:
        heads = linear_layer_names(net)
        if not heads:
            raise UserError(f"{spec} has no nn.Linear head to split at")
        head = heads[-1]
    if not isinstance(head, str):
        raise UserError(f"{spec}: head must be a module name, not {head!r}")
    mean, std = _input_stats(net, mean, std)
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"{spec} takes 3-channel input: give 3 values of mean and of std")
    model = ExternalModel(net, head, preprocess, mean, std)
    model.source = {"model": spec, **options}
    return model


def _input_stats(
    net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` / ``std``, by default ImageNet's (timm: the model's ``pretrained_cfg``)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(mean or cfg.get("mean", IMAGENET_MEAN)), tuple(std or cfg.get("std", IMAGENET_STD))


def _check_input(
    net: nn.Module,
    spec: str,
    input_shape: Sequence[int] | None,
    preprocess: Preprocess,
    stats_channels: int,
) -> tuple[int, int, int] | None:
    """Refuse data whose channels the model cannot take; the shape of the probe forward."""
    if input_shape is None:
        return None
    channels = int(input_shape[0])
    if preprocess.gray_to_rgb and channels != 1:
        raise UserError(
            f"--gray-to-rgb repeats a grey channel, but the images have {channels} channels; "
            "drop it"
        )
    shape = preprocess.output_shape(input_shape)
    conv = _first_conv(net)
    takes = conv.in_channels if conv is not None else stats_channels
    if shape[0] != takes:
        hint = "; add --gray-to-rgb to repeat the grey channel" if shape[0] == 1 else ""
        raise UserError(f"{spec} takes {takes}-channel images but the data's have {shape[0]}{hint}")
    if stats_channels != takes:
        raise UserError(
            f"{spec} takes {takes}-channel images but the mean/std give {stats_channels} "
            "values; give one per channel"
        )
    return shape


def _input_size_error(
    spec: str, input_shape: Sequence[int] | None, preprocess: Preprocess, e: Exception
) -> UserError:
    size = "x".join(map(str, preprocess.output_shape(input_shape))) if input_shape else "?"
    text = str(e).strip()
    last = text.splitlines()[-1].strip() if text else type(e).__name__
    return UserError(
        f"{spec} cannot run on {size} images ({last}); feed it the size it was built for "
        "with --resize/--crop"
    )
