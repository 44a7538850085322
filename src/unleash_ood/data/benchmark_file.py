"""A benchmark described by a small JSON or YAML file, its image files streamed
(:mod:`streaming`).

The JSON form (the ``#`` notes are not part of it)::

    {
      "name": "my-bench",
      "resolution": 32, "channels": 3,          # what every image is brought to
      "pre_size": 36,                           # optional: short side before the centre crop
      "classes": ["cat", "dog"],                # or their number, e.g. 2
      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],   # optional (default 0.5 / 0.25)
      "root": "data",                           # optional: base of relative paths
      "id": {"train": SOURCE, "val": SOURCE, "test": SOURCE},
      "ood_val": {"name": SOURCE, ...},         # optional
      "ood_test": {"name": SOURCE, ...},
      "groups": {"near": ["name", ...], "far": [...]}       # optional
    }

The same in YAML (``.yaml`` / ``.yml``, read with ``yaml.safe_load`` when PyYAML, the
``yaml`` extra, is installed), checked by the same :func:`check_spec`::

    name: my-bench
    resolution: 32
    channels: 3
    classes: [cat, dog]
    id: {train: train, val: val, test: test}
    ood_test:
      noise: noise
      textures: {imglist: lists/textures.txt, root: images}

A SOURCE is a folder (a string, or ``{"folder": ...}``), in ImageFolder layout for ID sets
(one sub-folder per class) and any layout for OOD sets; or an OpenOOD v1.5 image list
``{"imglist": "list.txt", "root": "images"}`` (``relative/path label`` per line; labels are
ignored for OOD sets). Relative paths are taken from ``root``, itself relative to the file's
folder. The file is untrusted input: every field is checked before any image is listed, and a
mistake is one line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unleash_ood.data.base import Benchmark
from unleash_ood.data.streaming import ImageFiles, class_folder_files, folder_files, imglist_files
from unleash_ood.errors import UserError

KEYS = {"name", "resolution", "channels", "pre_size", "classes", "mean", "std", "root", "id"}
KEYS |= {"ood_val", "ood_test", "groups"}
YAML_SUFFIXES = (".yaml", ".yml")
REQUIRED = ("name", "resolution", "channels", "classes", "id", "ood_test")
ID_SPLITS = ("train", "val", "test")


def load_benchmark_file(path: str | Path) -> Benchmark:
    """The :class:`Benchmark` a JSON or YAML file describes (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"benchmark file {path}: not readable ({e})") from None
    spec = read_yaml(text, path) if path.suffix in YAML_SUFFIXES else read_json(text, path)
    return benchmark_from_spec(spec, path.parent, str(path))


def read_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"benchmark file {path}: not readable JSON ({e})") from None


def read_yaml(text: str, path: Path) -> Any:
    """YAML through ``yaml.safe_load`` (plain data only: no Python objects are ever built)
    when PyYAML, an optional extra, is installed."""
    try:
        import yaml
    except ImportError:
        raise UserError(
            f"benchmark file {path}: reading YAML needs PyYAML; pip install pyyaml "
            "(or write the file as JSON)"
        ) from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = " ".join(str(e).split())  # its message spans lines: one line here
        raise UserError(f"benchmark file {path}: not readable YAML ({where})") from None
    _check_string_keys(spec, path, set())
    return spec


def _check_string_keys(value: Any, path: Path, seen: set[int]) -> None:
    """YAML, unlike JSON, allows keys that are numbers, dates or lists: refuse them, so that
    the spec holds what a JSON file can. Each container is visited once (YAML aliases may
    share one many times, or hold themselves)."""
    if not isinstance(value, dict | list) or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise UserError(f"benchmark file {path}: key {bad[0]!r} is not a string; quote it")
        value = list(value.values())
    for item in value:
        _check_string_keys(item, path, seen)


def benchmark_from_spec(spec: Any, base: Path, where: str) -> Benchmark:
    """Build a :class:`Benchmark` from a parsed spec; relative paths start at ``base``;
    ``where`` names the spec in errors."""
    check_spec(spec, where)
    root = base / spec.get("root", ".")
    size, channels, pre_size = spec["resolution"], spec["channels"], spec.get("pre_size")
    classes = spec["classes"]
    names = tuple(classes) if isinstance(classes, list) else ()
    num_classes = len(names) or classes

    def ood(split: str) -> dict[str, ImageFiles]:
        return {
            name: _files(src, root, f"{split}/{name}", size, channels, pre_size, None, where)
            for name, src in spec.get(split, {}).items()
        }

    id_sets = {
        split: _files(
            spec["id"][split],
            root,
            f"id_{split}",
            size,
            channels,
            pre_size,
            num_classes,
            where,
            names,
        )
        for split in ID_SPLITS
    }
    for split, data in id_sets.items():
        if len(data.labels) and int(data.labels.max()) >= num_classes:
            raise UserError(
                f"{where}: id.{split} has labels up to {int(data.labels.max())} but the "
                f"benchmark has {num_classes} classes; fix 'classes'"
            )
    mean = tuple(spec.get("mean", [0.5] * channels))
    std = tuple(spec.get("std", [0.25] * channels))
    return Benchmark(
        name=spec["name"],
        num_classes=num_classes,
        mean=mean,
        std=std,
        id_train=id_sets["train"],
        id_val=id_sets["val"],
        id_test=id_sets["test"],
        ood_test=ood("ood_test"),
        ood_val=ood("ood_val"),
        class_names=names,
        ood_groups={g: tuple(m) for g, m in spec.get("groups", {}).items()},
    )


def _files(
    src: str | dict,
    root: Path,
    name: str,
    size: int,
    channels: int,
    pre_size: int | None,
    num_classes: int | None,
    where: str,
    classes: tuple[str, ...] = (),
) -> ImageFiles:
    """One SOURCE as files: labelled when ``num_classes`` is given (ID data), a class folder's
    sub-folders named by ``classes`` when given."""
    src = {"folder": src} if isinstance(src, str) else src
    if "imglist" in src:
        return imglist_files(
            root / src["imglist"],
            root / src.get("root", "."),
            name,
            size,
            channels,
            labelled=num_classes is not None,
            num_classes=num_classes,
            pre_size=pre_size,
        )
    folder = root / src["folder"]
    if not folder.is_dir():
        raise UserError(f"{where}: folder {folder} of {name} does not exist")
    if num_classes is None:
        return folder_files(folder, name, size, channels, pre_size)
    return class_folder_files(folder, name, size, channels, classes, pre_size)[0]


# --------------------------------------------------------------------------- schema


def check_spec(spec: Any, where: str) -> None:
    """Every field's presence and type, in one pass; the first mistake is a one-line error."""

    def fail(what: str) -> None:
        raise UserError(f"{where}: {what}")

    if not isinstance(spec, dict):
        fail("expected an object (a mapping of field names to values)")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        fail(f"unknown field {unknown[0]!r}; fields are {', '.join(sorted(KEYS))}")
    for key in REQUIRED:
        if key not in spec:
            fail(f"missing field {key!r}")
    if not isinstance(spec["name"], str) or not spec["name"]:
        fail("'name' must be a non-empty string")
    for key in ("resolution", "pre_size"):
        if key in spec and not (_is_int(spec[key]) and spec[key] > 0):
            fail(f"{key!r} must be a positive integer, got {spec[key]!r}")
    if spec["channels"] not in (1, 3):
        fail(f"'channels' must be 1 or 3, got {spec['channels']!r}")
    if spec.get("pre_size", spec["resolution"]) < spec["resolution"]:
        fail("'pre_size' must be at least 'resolution'")
    classes = spec["classes"]
    if isinstance(classes, list):
        if not classes or not all(isinstance(c, str) and c for c in classes):
            fail("'classes' must be a positive number or a list of class names")
        if len(set(classes)) != len(classes):
            fail("'classes' names a class twice")
    elif not (_is_int(classes) and classes > 0):
        fail("'classes' must be a positive number or a list of class names")
    for key in ("mean", "std"):
        value = spec.get(key, [0.5] * spec["channels"])
        if (
            not isinstance(value, list)
            or len(value) != spec["channels"]
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or (key == "std" and not all(v > 0 for v in value))
        ):
            fail(f"{key!r} must be a list of {spec['channels']} numbers (std positive)")
    if "root" in spec and not isinstance(spec["root"], str):
        fail("'root' must be a path (a string)")
    if not isinstance(spec["id"], dict) or sorted(spec["id"]) != sorted(ID_SPLITS):
        fail("'id' must have exactly the sources 'train', 'val' and 'test'")
    for split in ID_SPLITS:
        _check_source(spec["id"][split], f"id.{split}", fail)
    for key in ("ood_val", "ood_test"):
        sets = spec.get(key, {})
        if not isinstance(sets, dict) or (key == "ood_test" and not sets):
            fail(f"{key!r} must map set names to sources (ood_test: at least one)")
        for name, src in sets.items():
            _check_source(src, f"{key}.{name}", fail)
    groups = spec.get("groups", {})
    if not isinstance(groups, dict):
        fail("'groups' must map group names to lists of ood_test set names")
    for group, members in groups.items():
        if not isinstance(members, list) or not members:
            fail(f"group {group!r} must be a non-empty list of ood_test set names")
        strays = [m for m in members if m not in spec["ood_test"]]
        if strays:
            fail(f"group {group!r} names {strays[0]!r}, which is not an ood_test set")


def _check_source(src: Any, field: str, fail) -> None:
    if isinstance(src, str) and src:
        return
    if isinstance(src, dict):
        keys = set(src)
        if keys == {"folder"} and isinstance(src["folder"], str):
            return
        if (
            "imglist" in keys
            and keys <= {"imglist", "root"}
            and all(isinstance(v, str) and v for v in src.values())
        ):
            return
    fail(
        f"{field} must be a folder (a string or {{'folder': ...}}) or an image list "
        "{'imglist': ..., 'root': ...}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
