"""Argument types, shared flag groups and the recipe flags of the ``unleash`` sub-commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from unleash_ood.errors import UserError
from unleash_ood.specs import Recipe, benchmark_augmentation


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line that says where help is (not the usage block),
    and an unknown flag reported by the command it was given to (argparse leaves it to the
    top-level parser, whose help does not list the command's flags)."""

    has_commands = False

    def add_subparsers(self, **kwargs) -> argparse._SubParsersAction:
        self.has_commands = True
        return super().add_subparsers(**kwargs)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not self.has_commands:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _integer_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; ``expected`` names it in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


non_negative_int = _integer_at_least(0, "an integer >= 0")
positive_int = _integer_at_least(1, "a positive integer")


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def number_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        msg = f"expected numbers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def count(n: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``: a count with its noun, for the commands' summary lines."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--benchmark",
        default="fmnist",
        help="benchmark suite (see 'unleash datasets') or a benchmark .json / .yaml file",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding datasets (also $UNLEASH_DATA; default: system locations)",
    )


def add_device_args(p: argparse.ArgumentParser, progress: str = "no progress bars") -> None:
    """``--device`` and ``--no-progress``, which every command that computes takes."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help=progress)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--no-progress`` and the evaluation batch size."""
    add_device_args(p)
    p.add_argument("--batch-size", type=positive_int, default=512, help="evaluation batch size")


def add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="processes decoding streamed image files (benchmark files, imagenet-openood) in "
        "every pass over data: training, validation, xi's estimate, outlier batches, tracking; "
        "0 decodes in the command's own process",
    )


def run_config(args: argparse.Namespace) -> dict:
    """The command line as a JSON-able dict, for the run directory's config.json."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def model_kwargs(pairs: list[str]) -> dict:
    """``--model-arg width=64`` -> {"width": 64}; values are parsed as JSON where they can be."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--model-arg expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


_FLAG_TYPES = {"int": int, "float": float, "str": str}


def add_spec_flags(
    p: argparse.ArgumentParser,
    spec,
    names: Sequence[str],
    defaults,
    recipe: str = "the --recipe's value",
    helps: dict[str, str] | None = None,
) -> None:
    """One ``--field-name`` flag per field of the spec dataclass ``spec`` in ``names``, from the
    field's type and :func:`~unleash_ood.specs.knob` metadata. ``defaults`` is an instance
    whose values the flags default to, or None when a named recipe supplies every value a
    flag does not set (``finetune --recipe``, ``detector train --kind``); the help then names
    that default with ``recipe``. ``helps`` replaces the help of some fields."""
    fields = {f.name: f for f in dataclasses.fields(spec)}
    for name in names:
        f = fields[name]
        default = None if defaults is None else getattr(defaults, name)
        text = (helps or {}).get(name, f.metadata["help"]).replace("%", "%%")
        if defaults is None:
            text += f" (default: {recipe})"
        kwargs = {"default": default, "help": text}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type == "tuple[float, ...]":
            kwargs.update(type=number_list, default=",".join(map(str, default)))
        else:
            kwargs.update(type=_FLAG_TYPES[f.type], choices=f.metadata["choices"])
        p.add_argument("--" + name.replace("_", "-"), **kwargs)


def add_recipe_args(p: argparse.ArgumentParser, defaults, **named) -> None:
    """Optimisation flags shared by the training commands (see :func:`add_spec_flags`)."""
    add_spec_flags(p, Recipe, RECIPE_FLAGS, defaults, **named)


RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "augment",
    "seed",
    "save_every",
)


def recipe_from(args: argparse.Namespace, base=None, **fixed):
    """The recipe of the flags: ``base``'s values (default: Recipe() with the benchmark's
    augmentation) with every flag given explicitly (not None) on top, and ``fixed`` last."""
    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    base = base or Recipe(augment=benchmark_augmentation(args.benchmark))
    return replace(base, **given, **fixed)


# Flags that describe a model given by --model (a torchvision/timm architecture), not a checkpoint.
OWN_MODEL_FLAGS = ("weights", "head", "class_map", "resize", "crop", "gray_to_rgb")


def add_own_model_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``--model``: weights, head, class map and the model's preprocessing."""
    p.add_argument(
        "--weights",
        default=None,
        help="with --model: a .safetensors or .pth state dict, or none for random weights",
    )
    p.add_argument(
        "--head", default=None, help="with --model: the final nn.Linear (default: found)"
    )
    p.add_argument(
        "--class-map",
        default=None,
        metavar="JSON",
        help='with --model: {"<benchmark class>": <model output>, ...} for a head of other '
        "classes (e.g. ImageNet's 1000)",
    )
    p.add_argument(
        "--resize",
        type=positive_int,
        default=None,
        help="with --model: resize images so their shorter side has this many pixels",
    )
    p.add_argument(
        "--crop", type=positive_int, default=None, help="with --model: then centre-crop this size"
    )
    p.add_argument(
        "--gray-to-rgb",
        action="store_true",
        help="with --model: repeat a grey image's channel for an RGB model",
    )


def check_own_model_args(args: argparse.Namespace, checkpoint: str) -> None:
    """--model needs --weights; the own-model flags mean nothing with a checkpoint (the flag
    whose destination is ``checkpoint``: ``--checkpoint``, ``--from``)."""
    if args.model and args.weights is None:
        raise UserError(f"--model {args.model} needs --weights FILE (or --weights none)")
    if getattr(args, checkpoint):
        given = [f for f in OWN_MODEL_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            name = "--" + checkpoint.rstrip("_").replace("_", "-")
            raise UserError(
                f"{flag} goes with --model, not {name}: a checkpoint carries its own settings"
            )
    if args.class_map and not Path(args.class_map).is_file():
        raise UserError(f"--class-map {args.class_map} does not exist; give a JSON file")


def load_own_model(args: argparse.Namespace, bench):
    """The model of ``--model`` and its flags, checked against the benchmark's classes and
    images (:func:`unleash_ood.models.load_model`)."""
    from unleash_ood.models import Preprocess, load_model  # deferred: loads PyTorch

    return load_model(
        args.model,
        args.weights,
        num_classes=bench.num_classes,
        input_shape=bench.image_shape,
        head=args.head,
        class_map=args.class_map,
        preprocess=Preprocess(args.resize, args.crop, args.gray_to_rgb),
    )
