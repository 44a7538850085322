"""Checkpoints: safetensors weights plus a JSON sidecar that says how to rebuild the model.

``name.safetensors`` holds tensors only, so loading one can never execute code (unlike
``torch.load`` of a pickle). ``name.json`` holds the architecture, class count, input shape,
normalisation, the training recipe and whatever metrics the writer adds. Both files are
written to temporary names and renamed into place, the sidecar last: a checkpoint whose sidecar
exists is complete, and an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unleash_ood.errors import UserError
from unleash_ood.models import Classifier, create_model
from unleash_ood.models.base import load_fitting_state
from unleash_ood.models.external import ExternalModel, own_model_options
from unleash_ood.models.masked import apply_umap
from unleash_ood.models.watermark import Watermarked

FORMAT = "unleash-ood/1"
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


EPOCH_FILE = re.compile(r"epoch_(\d+)\.json$")


def epoch_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every per-epoch checkpoint in ``run/checkpoints``, in order."""
    found = sorted(
        (int(m.group(1)), p.with_suffix(""))
        for p in (run / "checkpoints").glob("epoch_*.json")
        if (m := EPOCH_FILE.search(p.name))
    )
    if not found:
        raise UserError(
            f"no epoch checkpoints in {run}/checkpoints; train with "
            f"'unleash pretrain --out {run}' first"
        )
    return found


def model_dirs() -> list[Path]:
    """Folders searched for a checkpoint given by bare name: ``$UNLEASH_WEIGHTS`` (a team's
    own collection of named models), then the models shipped with the package."""
    extra = os.environ.get("UNLEASH_WEIGHTS")
    return [*([Path(extra).expanduser()] if extra else []), SHIPPED_DIR]


def shipped_models() -> list[str]:
    """Names of the models a bare name can refer to (``fmnist_cnn``, ...)."""
    return sorted({p.stem for d in model_dirs() for p in d.glob("*.json")})


def checkpoints_in(folder: Path) -> list[str]:
    """Names of the complete checkpoints (both files) in ``folder``: ``final``, ``best`` and
    ``last`` first, then the rest in name order."""
    names = sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())
    return sorted(names, key=lambda n: (n not in ("final", "best", "last"), n))


def not_a_checkpoint(folder: Path) -> UserError:
    """The error for a folder given where a checkpoint is expected, naming the checkpoint a
    run folder holds (``final``, ``best`` or ``last``, in itself or its ``checkpoints/``)."""
    for d in (folder / "checkpoints", folder):
        for name in ("final", "best", "last"):
            if all((d / f"{name}{ext}").is_file() for ext in (".safetensors", ".json")):
                return UserError(f"{folder} is a folder, not a checkpoint; pass {d / name}")
    return UserError(
        f"{folder} is a folder, not a checkpoint; pass a checkpoint's path (X for the files "
        f"X.safetensors and X.json)"
    )


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, sidecar) for ``x``, ``x.safetensors`` or ``x.json``; a bare name that is no
    local file, such as ``fmnist_cnn``, names a model in :func:`model_dirs`. A path such as
    ``.`` or ``/``, which cannot name a pair of files, is refused."""
    p = Path(path)
    if p.name in ("", ".."):
        raise not_a_checkpoint(p)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    if len(stem.parts) == 1 and not stem.with_name(stem.name + ".json").exists():
        for folder in model_dirs():
            if (folder / f"{stem.name}.json").exists():
                stem = folder / stem.name
                break
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def model_spec(
    model: Classifier,
    architecture: str,
    input_size: int,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a sidecar needs to rebuild ``model`` without the code that trained it."""
    return {
        "architecture": architecture,
        "model_kwargs": model_kwargs or {},
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "input_size": input_size,
        "mean": model.input_mean.flatten().tolist(),
        "std": model.input_std.flatten().tolist(),
    }


def own_model_spec(model: ExternalModel, input_size: int) -> dict[str, Any]:
    """:func:`model_spec` of your own model (``load_model``'s): the checkpoint rebuilds it by
    its ``torchvision:``/``timm:`` name with its head and preprocessing
    (:func:`~unleash_ood.models.external.own_model_options`), so every command that takes a
    checkpoint takes it."""
    return model_spec(model, model.source["model"], input_size, own_model_options(model))


SPEC_KEYS = (
    "architecture",
    "model_kwargs",
    "num_classes",
    "in_channels",
    "input_size",
    "mean",
    "std",
)


def spec_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a sidecar that rebuilds the dense architecture (no recipe, no metrics)."""
    return {k: meta[k] for k in SPEC_KEYS}


def save_checkpoint(
    path: str | os.PathLike, model: Classifier, spec: dict[str, Any], **extra: Any
) -> Path:
    """Write weights and sidecar atomically; ``extra`` (recipe, epoch, metrics) goes in the JSON."""
    weights, sidecar = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, weights)
    atomic_write_json(sidecar, {"format": FORMAT, **spec, **extra})
    return weights


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (which runs no code), or a one-line error when the
    file is missing, truncated or not safetensors at all."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e


def missing_checkpoint(path: str | os.PathLike, weights: Path, sidecar: Path) -> UserError:
    """The error for a checkpoint path that names no pair of files, naming the checkpoints its
    folder does hold (a pretraining run writes ``last``, not ``final``), or for a bare name
    the shipped ones."""
    bare = len(Path(path).parts) == 1
    held = checkpoints_in(weights.parent) if weights.parent.is_dir() and not bare else []
    if held:
        more = f" and {len(held) - 6} more" if len(held) > 6 else ""
        return UserError(
            f"no checkpoint at {path}: {weights.parent} holds {', '.join(held[:6])}{more}; "
            f"pass one of them, e.g. {weights.parent / held[0]}"
        )
    return UserError(
        f"no checkpoint at {path}: expected files {weights.name} and {sidecar.name} in "
        f"{weights.parent} (or a shipped model: {', '.join(shipped_models())})"
    )


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of checkpoint ``path``, checked against the schema (it is untrusted input)."""
    weights, sidecar = checkpoint_paths(path)
    if not sidecar.is_file() or not weights.is_file():
        if Path(path).is_dir():
            raise not_a_checkpoint(Path(path))
        raise missing_checkpoint(path, weights, sidecar)
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{sidecar} is not valid JSON ({e}); the checkpoint is damaged") from e
    check_sidecar(meta, sidecar)
    return meta


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _numbers(v: Any, n: int) -> bool:
    return (
        isinstance(v, list)
        and len(v) == n
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        and all(math.isfinite(x) for x in v)
    )


def _stats_channels(meta: dict[str, Any]) -> Any:
    """How many mean/std values a sidecar needs: one per channel the model normalises, 3 for
    an RGB model of your own fed grey images (``gray_to_rgb``), else one per image channel."""
    options = meta.get("model_kwargs")
    grey_to_rgb = isinstance(options, dict) and options.get("gray_to_rgb") is True
    return 3 if grey_to_rgb else meta.get("in_channels")


def check_sidecar(meta: Any, sidecar: Path) -> None:
    """Refuse a sidecar that cannot describe a model: wrong type, missing or malformed keys."""
    if not isinstance(meta, dict):
        raise UserError(f"{sidecar} holds a JSON {type(meta).__name__}, not a checkpoint sidecar")
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{sidecar} is not an unleash-ood checkpoint sidecar "
            f"(format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    checks = [
        ("architecture", isinstance(meta.get("architecture"), str)),
        ("model_kwargs", isinstance(meta.get("model_kwargs", {}), dict)),
        ("in_channels", _positive_int(meta.get("in_channels"))),
        ("input_size", _positive_int(meta.get("input_size"))),
    ]
    if not meta.get("detector"):  # a classifier's: generative detectors have no classes
        checks += [
            ("num_classes", _positive_int(meta.get("num_classes"))),
            ("mean", _numbers(meta.get("mean"), _stats_channels(meta))),
            ("std", _numbers(meta.get("std"), _stats_channels(meta))),
            ("umap", isinstance(meta.get("umap", {}), dict | type(None))),
            ("watermark", isinstance(meta.get("watermark", {}), dict | type(None))),
        ]
    problems = [key for key, ok in checks if not ok]
    if not problems and any(x <= 0 for x in meta.get("std", ())):
        problems.append("std")
    if problems:
        raise UserError(
            f"{sidecar} is damaged: {', '.join(problems)} missing or malformed "
            f"(see the checkpoint format in docs/architecture.md)"
        )


def build_model(meta: dict[str, Any]) -> Classifier:
    """The architecture a sidecar describes; UMAP runs get their masked layers back."""
    try:
        model = create_model(
            meta["architecture"],
            num_classes=meta["num_classes"],
            in_channels=meta["in_channels"],
            mean=meta["mean"],
            std=meta["std"],
            **meta.get("model_kwargs", {}),
        )
    except UserError as e:
        raise UserError(f"the checkpoint's model cannot be built: {e}") from e
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"the sidecar's architecture {meta['architecture']!r} with options "
            f"{meta.get('model_kwargs', {})} cannot be built ({e}); the checkpoint is damaged"
        ) from e
    if meta.get("umap"):
        apply_umap(model, **meta["umap"])
    if meta.get("watermark"):  # an input pattern learned by 'unleash watermark'
        size = meta["input_size"]
        model = Watermarked(model, torch.zeros(meta["in_channels"], size, size))
    return model


def other_benchmark_hint(meta: dict[str, Any]) -> str:
    """What to do when a checkpoint does not fit the data: name the benchmark its sidecar
    records (the commands default to ``fmnist``, whatever the checkpoint was trained on)."""
    trained_on = meta.get("benchmark")
    if isinstance(trained_on, str) and trained_on:
        return (
            f"it was trained on benchmark {trained_on!r}: pass --benchmark with that name "
            f"(or its .json / .yaml file), or use a checkpoint trained on this benchmark"
        )
    return "use a checkpoint trained on this benchmark"


def load_checkpoint(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from its sidecar and load the weights (never unpickling anything).

    ``num_classes`` / ``input_shape`` state what the caller's data needs, so a checkpoint of
    another task is refused with a clear message instead of failing deep inside a forward pass.
    """
    meta = read_sidecar(path)
    weights, _ = checkpoint_paths(path)
    if meta.get("detector"):
        raise UserError(
            f"{path} is a generative detector, not a classifier; evaluate it with "
            f"'unleash detector evaluate --from {path}'"
        )
    fix = other_benchmark_hint(meta)
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise UserError(
            f"{weights.name} predicts {meta['num_classes']} classes but the data has "
            f"{num_classes}; {fix}"
        )
    have = (meta["in_channels"], meta["input_size"], meta["input_size"])
    if input_shape is not None and tuple(input_shape) != have:
        raise UserError(
            f"{weights.name} takes {have[0]}x{have[1]}x{have[2]} input but the data is "
            f"{'x'.join(map(str, input_shape))}; {fix}"
        )
    model = build_model(meta)
    load_fitting_state(
        model,
        read_tensors(weights),
        weights.name,
        f"architecture {meta['architecture']!r}",
        "the sidecar and weights disagree",
    )
    return model.to(device).eval(), meta
