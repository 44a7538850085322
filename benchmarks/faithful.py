"""Unleashing Mask as published, on fmnist: a resumable study of UM and UMAP with the paper's
recipes, paired against the plain cross-entropy control.

    python benchmarks/faithful.py [--runs-dir runs/faithful] [--out benchmarks/results/faithful]
                                  [--phases paper30,paper100,pretrain,oe,noise,xi]
                                  [--seeds 0,1,2] [--resume]

Every arm is one ``unleash`` command in its own run directory under ``--runs-dir``, run as a
child process (so the study exercises exactly what a user runs) and evaluated once with every
scorer on the OOD validation and test sets (``evaluation.json`` beside it). Finished arms are
skipped; an interrupted one continues with ``--resume``. After every arm the tables are
rebuilt from whatever has finished, into ``<out>.md`` and ``<out>.json``. An arm those tables
record but whose run directory is gone keeps its record and is not trained again, unless its
phase is named by ``--rerun-recorded`` (default ``paper100``, whose weights the demo ships;
``benchmarks/ship_finetunes.py`` needs their run directories). Nothing is tuned on
OOD test sets: xi comes from the random-mask estimate on training data, or from the OOD
*validation* sets (phase ``xi``); the noisy runs' selected epoch from validation data only.
``--seeds`` runs the arms of some seeds only (the tables still hold every finished arm):
``--seeds 0`` first gives every question a one-seed answer before any question gets three.

Phases, in the default order (seed 0 is the shipped model; seeds 1 and 2 are retrained with
the default pretraining recipe). An arm whose input another arm makes (seeds 1 and 2 need
``pretrain``) is skipped until then: the runner repeats its passes while any arm ran.
- ``paper30``: CE, UM, UMAP with ``--recipe paper --epochs 30``, three seeds.
- ``paper100``: CE, UM, UMAP with ``--recipe paper`` (100 epochs, lr 0.1 cosine), seed 0.
- ``pretrain``: the default-recipe models of seeds 1 and 2, kept in ``benchmarks/starts/``
  when finished (commit them: the arms of those seeds start from them; so are the noisy
  models of ``noise``).
- ``oe``: OE alone, OE + UM, OE + UMAP with ``--recipe paper-oe`` and the bundled outliers.
- ``noise``: a model trained with 20 % symmetric label noise on a 20,000-image stratified
  subset (tracked every epoch), ``unleash atypical`` on it, then CE, UM, UMAP with the paper
  recipe on the same noisy data, three seeds.
- ``xi``: UM at 0.5x and 2x the estimate (the 1x arm is ``paper30``'s UM), 30 epochs, the
  ``--xi validate`` rule applied to the three: best mean Energy AUROC on the OOD validation
  sets among those within 1 point of the start model's ID validation accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import METRICS, summarise

from unleash_ood.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_paths,
    load_checkpoint,
)
from unleash_ood.data import load_benchmark
from unleash_ood.demo import shipped_checkpoint
from unleash_ood.evaluate import evaluate
from unleash_ood.method.finetune import select_xi
from unleash_ood.report import markdown_table, mean_std

SEEDS = (0, 1, 2)
METHODS = ("ce", "um", "umap")
NOISE = {"fraction": 0.2, "train_size": 20_000}
XI_FACTORS = (0.5, 2.0)
SCORERS = ("energy", "msp", "all")
# The scorers every arm is evaluated with, fixed so that ``all`` averages the same set for
# every model whenever it was evaluated (the registry grows).
SCORER_SET = (
    "msp",
    "maxlogit",
    "energy",
    "gen",
    "odin",
    "mahalanobis",
    "knn",
    "vim",
    "react",
    "ash_s",
    "ash_b",
    "dice",
)
PHASES = ("paper30", "paper100", "pretrain", "oe", "noise", "xi")
SRC = Path(__file__).resolve().parent.parent / "src"
# The pretrained models of seeds 1 and 2, kept beside this script (weights and sidecar, as
# the shipped seed-0 model) once their runs finish: every arm of those seeds is paired against
# them, so an arm trained later, or again, starts from the same model without an hour of
# pretraining, even where the runs directory is gone.
STARTS = Path(__file__).resolve().parent / "starts"


@dataclass
class Arm:
    """One run: ``args`` of the ``unleash`` command (``--out`` and ``--resume`` added here),
    and the checkpoint it leaves behind (None for analyses that write no model)."""

    name: str
    out: Path
    args: Callable[[], list[str]]
    model: Path | None
    epochs: int | None = None  # for pretraining: done when the last checkpoint reaches it
    needs: list[Path] = field(default_factory=list)  # files that must exist first
    trained: Path | None = None  # where the run leaves the model, when ``model`` keeps a copy

    def done(self) -> bool:
        if self.model is None:
            return (self.out / "done.json").exists()
        return reached(self.model, self.epochs)

    def keep(self) -> None:
        """Copy the model the run left in ``trained`` to ``model`` once it reached its epochs
        (the sidecar last: it marks the copy complete)."""
        if self.trained is None or self.done() or not reached(self.trained, self.epochs):
            return
        (weights, sidecar), (kept_weights, kept_sidecar) = map(
            checkpoint_paths, (self.trained, self.model)
        )
        kept_sidecar.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, kept_weights)
        shutil.copyfile(sidecar, kept_sidecar)

    def started(self) -> bool:
        return (self.out / "checkpoints" / "last.json").exists()


def reached(model: Path, epochs: int | None) -> bool:
    """Whether checkpoint ``model`` exists and has trained ``epochs`` epochs (any, for None)."""
    sidecar = model.with_suffix(".json")
    if not sidecar.exists():
        return False
    return epochs is None or json.loads(sidecar.read_text())["epoch"] >= epochs


def start_model(runs: Path, seed: int) -> Path:
    """The model the arms of ``seed`` start from: the shipped one, or the kept pretrain."""
    return shipped_checkpoint() if seed == 0 else STARTS / f"fmnist_cnn_seed{seed}"


def noisy_model(seed: int) -> Path:
    """The label-noise model the ``noise`` arms of ``seed`` start from, kept once trained (its
    sidecar records the subset and the flips, so ``atypical`` and the fine-tunes need no more)."""
    return STARTS / f"fmnist_cnn_noisy_seed{seed}"


def finetune_arm(name: str, out: Path, start: Path, extra: list[str], seed: int) -> Arm:
    args = ["finetune", "--from", str(start), "--seed", str(seed), *extra]
    return Arm(
        name, out, lambda: args, out / "checkpoints" / "final", needs=[start.with_suffix(".json")]
    )


def method_arms(phase: str, runs: Path, seed: int, start: Path, extra: list[str]) -> list[Arm]:
    base = runs / phase / f"seed{seed}"
    return [
        finetune_arm(f"{phase}/seed{seed}/{m}", base / m, start, ["--method", m, *extra], seed)
        for m in METHODS
    ]


def recorded_xi(record: dict, seed: int) -> float | None:
    """The xi that ``paper30``'s UM arm of ``seed`` used, as the earlier tables record it."""
    um = record.get("paper30", {}).get(f"seed{seed}", {}).get("um") or {}
    return (um.get("xi") or {}).get("xi")


def xi_arm(runs: Path, seed: int, factor: float, record: dict) -> Arm:
    """UM with xi = ``factor`` x the estimate that ``paper30``'s UM arm of this seed used: from
    its run directory, or from the earlier tables when only they hold that arm."""
    estimate = runs / "paper30" / f"seed{seed}" / "um" / "xi.json"
    out = runs / "xi" / f"seed{seed}" / f"x{factor:g}"
    kept = recorded_xi(record, seed)

    def args() -> list[str]:
        base = json.loads(estimate.read_text())["xi"] if estimate.exists() else kept
        xi = base * factor
        return [
            "finetune",
            "--from",
            str(start_model(runs, seed)),
            "--seed",
            str(seed),
            "--method",
            "um",
            "--recipe",
            "paper",
            "--epochs",
            "30",
            "--xi",
            f"{xi:.6g}",
        ]

    needs = [estimate] if kept is None else []
    return Arm(f"xi/seed{seed}/x{factor:g}", out, args, out / "checkpoints" / "final", needs=needs)


def phase_arms(phase: str, runs: Path, record: dict | None = None) -> list[Arm]:
    """The arms of ``phase``; ``record``: the earlier tables (``<out>.json``), which the ``xi``
    arms read their base xi from when ``paper30``'s run directories are gone."""
    if phase == "paper100":
        return method_arms(phase, runs, 0, start_model(runs, 0), ["--recipe", "paper"])
    if phase == "pretrain":
        arms = []
        for seed in SEEDS[1:]:
            out = runs / "pretrain" / f"seed{seed}"
            args = ["pretrain", "--seed", str(seed)]
            arms.append(
                Arm(
                    f"pretrain/seed{seed}",
                    out,
                    lambda a=args: a,
                    start_model(runs, seed),
                    epochs=60,
                    trained=out / "checkpoints" / "last",
                )
            )
        return arms
    if phase == "paper30":
        extra = ["--recipe", "paper", "--epochs", "30"]
        return [a for s in SEEDS for a in method_arms(phase, runs, s, start_model(runs, s), extra)]
    if phase == "oe":
        extra = ["--outliers", "oe", "--aux", "bundled", "--recipe", "paper-oe"]
        return [a for s in SEEDS for a in method_arms(phase, runs, s, start_model(runs, s), extra)]
    if phase == "noise":
        arms = []
        for seed in SEEDS:
            out = runs / "noise" / f"seed{seed}"
            pre = [
                "pretrain",
                "--seed",
                str(seed),
                "--train-size",
                str(NOISE["train_size"]),
                "--label-noise",
                str(NOISE["fraction"]),
                "--track",
            ]
            arms.append(
                Arm(
                    f"noise/seed{seed}/pretrain",
                    out / "pretrain",
                    lambda a=pre: a,
                    noisy_model(seed),
                    epochs=60,
                    trained=out / "pretrain" / "checkpoints" / "last",
                )
            )
            aty = ["atypical", "--from", str(noisy_model(seed)), "--seed", str(seed)]
            arms.append(
                Arm(
                    f"noise/seed{seed}/atypical",
                    out / "atypical",
                    lambda a=aty: a,
                    None,
                    needs=[noisy_model(seed).with_suffix(".json")],
                )
            )
            arms += method_arms("noise", runs, seed, noisy_model(seed), ["--recipe", "paper"])
        return arms
    if phase == "xi":
        return [xi_arm(runs, s, f, record or {}) for s in SEEDS for f in XI_FACTORS]
    raise SystemExit(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")


def run_arm(arm: Arm, resume: bool, src: Path = SRC) -> bool:
    """Run (or continue) one arm as a child ``unleash`` process with the package under ``src``,
    its output in ``<out>.log``; False when it still waits for the output of another arm."""
    missing = [p for p in arm.needs if not p.exists()]
    if missing:
        print(f"  skip {arm.name}: waits for {', '.join(map(str, missing))}", flush=True)
        return False
    cont = arm.started()
    if cont and not resume:
        raise SystemExit(f"{arm.out} holds an unfinished run; pass --resume to continue it")
    if not cont and arm.out.exists():
        shutil.rmtree(arm.out)  # started but never checkpointed: nothing to keep
    arm.out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "unleash_ood",
        *arm.args(),
        "--out",
        str(arm.out),
        "--no-progress",
        *(["--resume"] if cont else []),
    ]
    print(f"  {'resume' if cont else 'run'} {arm.name}: {' '.join(cmd[3:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with open(arm.out.parent / f"{arm.out.name}.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{arm.name} failed (exit {proc.returncode}); see {arm.out}.log")
    seconds = time.perf_counter() - t0
    timing = arm.out.parent / f"{arm.out.name}.time.json"
    spent = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    atomic_write_json(timing, {"seconds": spent + seconds})
    if arm.model is None:
        atomic_write_json(arm.out / "done.json", {"seconds": spent + seconds})
    return True


def evaluation_of(model: Path, cache: Path, bench) -> dict:
    """Every scorer on the OOD validation and test sets, computed once and kept in ``cache``."""
    if not cache.exists():
        net, _ = load_checkpoint(model, "cpu")
        ev = evaluate(net, bench, ",".join(SCORER_SET), splits=("val", "test"), progress=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, ev.to_dict())
    return json.loads(cache.read_text())


# ---------------------------------------------------------------------------------- tables


def below_chance(evaluation: dict) -> list[str]:
    """Scorers whose mean OOD test AUROC is under 0.5 on a start model: left out of ``all``
    (a scorer that ranks OOD above ID would hide every other scorer's change)."""
    return sorted(
        r["scorer"]
        for r in evaluation["rows"]
        if r["split"] == "test" and r["dataset"] == "mean" and r["auroc"] < 0.5
    )


def summary(evaluation: dict, exclude: list[str]) -> dict:
    return {s: summarise(evaluation, s, exclude) for s in SCORERS}


def val_auroc(evaluation: dict) -> float:
    return next(
        r["auroc"]
        for r in evaluation["rows"]
        if (r["split"], r["scorer"], r["dataset"]) == ("val", "energy", "mean")
    )


def seconds_of(out: Path) -> float | None:
    timing = out.parent / f"{out.name}.time.json"
    return json.loads(timing.read_text())["seconds"] if timing.exists() else None


def comparison(phase: dict, scorer: str, arms: tuple[str, ...]) -> list[str]:
    """Mean ± std over the seeds that finished each arm, then the paired differences against
    ``ce`` over the seeds that finished both."""
    keys = ("acc", *METRICS)
    rows, paired = [], []
    for arm in arms:
        seeds = [s for s in phase if arm in phase[s]]
        if not seeds:
            continue
        rows.append(
            [arm, len(seeds), *(mean_std([phase[s][arm][scorer][k] for s in seeds]) for k in keys)]
        )
        both = [s for s in seeds if "ce" in phase[s]]
        if arm in ("base", "ce") or not both:
            continue
        diffs = {
            k: [phase[s][arm][scorer][k] - phase[s]["ce"][scorer][k] for s in both] for k in keys
        }
        lower = sum(d < 0 for d in diffs["fpr95_id"])
        paired.append(
            [f"{arm} - ce", len(both), *(mean_std(diffs[k]) for k in keys), f"{lower}/{len(both)}"]
        )
    if not rows:
        return ["(no arm has finished yet)", ""]
    head = ["model", "seeds", "ID acc", "AUROC", "FPR95 (ID+)", "FPR95 (OOD+)"]
    lines = [f"**{scorer}**", "", markdown_table(head, rows)]
    if paired:
        lines += ["", markdown_table([*head, "FPR95 (ID+) lower in"], paired)]
    return [*lines, ""]


def gather(runs: Path, bench) -> dict:
    """``{phase: {seed: {arm: summary}}}`` of every finished arm (a seed's start model as
    ``base`` where an arm of that seed finished), and ``starts``: every start model's summary."""
    out: dict = {"excluded_from_all": {}, "starts": {}}
    bases = {}
    for seed in SEEDS:
        start = start_model(runs, seed)
        if start.with_suffix(".json").exists():
            bases[seed] = evaluation_of(start, runs / "base" / f"seed{seed}.json", bench)
            out["starts"][f"seed{seed}"] = summary(bases[seed], below_chance(bases[seed]))
    for phase in ("paper100", "paper30", "oe", "noise", "xi"):
        out[phase] = {}
        for seed in SEEDS:
            noisy = noisy_model(seed)
            if phase == "noise":
                if not noisy.with_suffix(".json").exists():
                    continue
                base = evaluation_of(noisy, runs / "noise" / f"seed{seed}" / "base.json", bench)
            elif seed in bases:
                base = bases[seed]
            else:
                continue
            exclude = below_chance(base)
            row = {
                "base": {
                    **summary(base, exclude),
                    "val_auroc": val_auroc(base),
                    "id_val_acc": base["accuracy"]["id_val"],
                }
            }
            for arm in phase_arms(phase, runs):
                if not arm.name.startswith(f"{phase}/seed{seed}/") or arm.model is None:
                    continue
                if arm.done() and arm.name.split("/")[-1] != "pretrain":
                    ev = evaluation_of(arm.model, arm.out / "evaluation.json", bench)
                    row[arm.name.split("/")[-1]] = {
                        **summary(ev, exclude),
                        "val_auroc": val_auroc(ev),
                        "id_val_acc": ev["accuracy"]["id_val"],
                        "seconds": seconds_of(arm.out),
                        "xi": xi_of(arm.out),
                    }
            if len(row) > 1:  # the start alone is not a result of this phase
                out[phase][f"seed{seed}"] = row
                out["excluded_from_all"][f"{phase}/seed{seed}"] = exclude
    return out


def carry_forward(results: dict, recorded: dict) -> list[str]:
    """Keep, in ``results``, the arms an earlier table recorded that ``--runs-dir`` holds no
    finished run of (lost or cleaned, or a rerun under way): a finished arm is never dropped
    from the tables, and a finished rerun replaces the record. Returns the names of the arms
    kept from the record."""
    kept = []
    for phase in ("paper100", "paper30", "oe", "noise", "xi"):
        for seed, row in recorded.get(phase, {}).items():
            now = results[phase].setdefault(seed, {})
            for arm, entry in row.items():
                if arm not in now:
                    now[arm] = entry
                    if arm != "base":
                        kept.append(f"{phase}/{seed}/{arm}")
            key = f"{phase}/{seed}"
            if key in recorded.get("excluded_from_all", {}):
                results["excluded_from_all"].setdefault(key, recorded["excluded_from_all"][key])
    return kept


def xi_of(out: Path) -> dict | None:
    f = out / "xi.json"
    if not f.exists():
        return None
    xi = json.loads(f.read_text())
    return {k: xi.get(k) for k in ("xi", "source", "train_loss")} | {
        "per_mask": (xi.get("estimate") or {}).get("per_mask")
    }


def xi_selection(results: dict) -> dict:
    """The ``--xi validate`` rule over 0.5x, 1x (``paper30``'s UM) and 2x, per seed."""
    chosen = {}
    for seed, row in results["xi"].items():
        um = results["paper30"].get(seed, {}).get("um")
        grid = {"x1": um, **{k: v for k, v in row.items() if k.startswith("x")}}
        if um is None or len(grid) < 1 + len(XI_FACTORS):
            continue
        cands = [
            {
                "arm": k,
                "xi": v["xi"]["xi"],
                "id_val_acc": v["id_val_acc"],
                "val_auroc": v["val_auroc"],
            }
            for k, v in grid.items()
        ]
        best = select_xi(cands, row["base"]["id_val_acc"], 0.01)
        chosen[seed] = {"grid": cands, "chosen": best["arm"], "summary": grid[best["arm"]]}
    return chosen


def xi_against_ce(results: dict, seed: str, chosen: dict) -> dict:
    """One seed's row for ``comparison``: its 30-epoch CE control, the UM arm at the estimated
    xi (``x1``) and the arm the validation rule chose."""
    paper30 = results["paper30"][seed]
    return {"ce": paper30["ce"], "x1": paper30["um"], "chosen": chosen}


def noise_extras(runs: Path, recorded: dict[str, list]) -> dict[str, list]:
    """Per noisy run (``{"seed0": row}``): the validation-selected epoch against the final
    one (Energy, mean OOD test AUROC from track.csv), and how many top-ranked atypical samples
    are flipped ones. The rows of ``recorded`` (the earlier tables') stand for runs whose
    folders are gone."""
    rows = dict(recorded)
    for seed in SEEDS:
        run = runs / "noise" / f"seed{seed}" / "pretrain"
        sel_file, track = run / "track_selection.json", run / "track.csv"
        if not sel_file.exists() or not track.exists():
            continue
        sel = json.loads(sel_file.read_text())
        with open(track) as f:
            auroc = {
                int(r["epoch"]): 100 * float(r["auroc"])
                for r in csv.DictReader(f)
                if (r["split"], r["scorer"], r["dataset"]) == ("test", "energy", "mean")
            }
        best = max(auroc, key=auroc.get)
        prec_file = runs / "noise" / f"seed{seed}" / "atypical" / "label_noise_precision.json"
        prec = json.loads(prec_file.read_text()) if prec_file.exists() else {}
        n = prec.get("n_flipped")
        rows[f"seed{seed}"] = [
            sel["selected_epoch"],
            f"{auroc[sel['selected_epoch']]:.2f}",
            sel["final_epoch"],
            f"{auroc[sel['final_epoch']]:.2f}",
            f"{best} ({auroc[best]:.2f})",
            *(
                f"{prec[k]:.3f}" if k in prec else "-"
                for k in ("precision@100", "precision@1000", f"precision@{n}")
            ),
            f"{prec['chance']:.3f}" if prec else "-",
        ]
    return rows


def read_record(out: Path) -> dict:
    """The earlier tables' JSON, ``{}`` before the first."""
    record = out.with_suffix(".json")
    return json.loads(record.read_text()) if record.exists() else {}


def kept_as_recorded(arm: Arm, record: dict, rerun: set[str]) -> bool:
    """True for an arm that ``record`` holds (a table row, or ``other_arms``: pretraining,
    ``atypical``) and that has not started in the runs directory, unless its phase is in
    ``rerun``: the tables keep its record and it is not trained again."""
    parts = arm.name.split("/")
    if parts[0] in rerun or arm.started():
        return False
    if arm.name in record.get("other_arms", {}):
        return True
    if len(parts) != 3:
        return False
    phase, seed, name = parts
    return name in record.get(phase, {}).get(seed, {})


def finished_times(runs: Path, results: dict, record: dict) -> dict[str, float | None]:
    """Every finished arm's training seconds (None where unknown): the tables' arms from their
    runs or the record, the others (pretraining, ``atypical``) from their runs or, when those
    are gone, ``record["other_arms"]``, kept in ``results["other_arms"]``."""
    times, others = {}, dict(record.get("other_arms", {}))
    for arm in (a for p in PHASES for a in phase_arms(p, runs) if a.done()):
        seconds, parts = seconds_of(arm.out), arm.name.split("/")
        if len(parts) == 3 and parts[2] not in ("pretrain", "atypical"):
            times[arm.name] = seconds
        elif seconds is not None or arm.name not in others:
            others[arm.name] = seconds
    for name in results["recorded_only"]:
        phase, seed, arm = name.split("/")
        times[name] = results[phase][seed][arm].get("seconds")
    results["other_arms"] = others
    return {**times, **others}


def starts_table(starts: dict[str, dict]) -> list[str]:
    """The start model of every seed: what each seed's arms are paired from."""
    rows = [
        [
            seed,
            f"{summaries['energy']['acc']:.2f}",
            *(f"{summaries[scorer][k]:.2f}" for scorer in SCORERS for k in ("auroc", "fpr95_id")),
        ]
        for seed, summaries in sorted(starts.items())
    ]
    head = ["seed", "ID acc"]
    head += [f"{scorer} {k}" for scorer in SCORERS for k in ("AUROC", "FPR95 (ID+)")]
    return [
        "## 0. The start models (seed 0: the shipped model; seeds 1 and 2: `unleash pretrain "
        "--seed S`, the same default recipe, kept in `benchmarks/starts/`)",
        "",
        markdown_table(head, rows) if rows else "(none yet)",
        "",
    ]


def write_tables(runs: Path, out: Path, bench) -> None:
    results, record = gather(runs, bench), read_record(out)
    results["recorded_only"] = carry_forward(results, record)
    results["xi_selection"] = xi_selection(results)
    results["noise_extras"] = noise_extras(runs, record.get("noise_extras", {}))
    lines = [
        "# Unleashing Mask with the paper's recipes on fmnist",
        "",
        "Written by `python benchmarks/faithful.py` from the arms finished so far; x100, means "
        "over the OOD test sets (noise excluded). `all` averages every scorer except those "
        "below chance on the start model (listed in the JSON). Paired differences are arm "
        "minus the CE control of the same seed, recipe and start.",
        "",
        *starts_table(results["starts"]),
    ]
    titles = {
        "paper100": "1. The full paper recipe (100 epochs, lr 0.1 cosine), shipped model (seed 0)",
        "paper30": "2. The paper recipe shortened to 30 epochs, three seeds",
        "oe": "4. Outlier exposure with the paper-oe recipe (10 epochs, lr 0.01)",
        "noise": "5. 20 % label noise (20,000-image subset): CE / UM / UMAP, paper recipe",
    }
    arms = {"oe": ("base", "ce", "um", "umap")}
    for phase, title in titles.items():
        lines += [f"## {title}", ""]
        for scorer in SCORERS:
            lines += comparison(results[phase], scorer, arms.get(phase, ("base", *METHODS)))
        if phase == "oe":
            lines += [
                "(`ce`, `um`, `umap` here carry the OE term: OE alone, OE + UM, OE + UMAP.)",
                "",
            ]
        if phase == "noise":
            head = [
                "run",
                "selected epoch",
                "AUROC there",
                "final epoch",
                "AUROC there",
                "best test epoch (AUROC)",
                "flipped in top 100",
                "in top 1000",
                "in top n_flipped",
                "chance",
            ]
            lines += [
                "Tracking and `unleash atypical` on the noisy models (Energy, test sets "
                "read only for this table, never for the selection):",
                "",
                markdown_table(
                    head, [[seed, *row] for seed, row in sorted(results["noise_extras"].items())]
                ),
                "",
            ]
    lines += [
        "## 3. xi chosen on the OOD validation sets (0.5x, 1x, 2x the estimate, 30 epochs)",
        "",
    ]
    sel = dict(sorted(results["xi_selection"].items()))
    rows = [
        [
            seed,
            ", ".join(
                f"{g['arm']} xi {g['xi']:.4f}: val AUROC {100 * g['val_auroc']:.2f}, "
                f"ID val {100 * g['id_val_acc']:.2f}"
                for g in v["grid"]
            ),
            v["chosen"],
            *(f"{v['summary']['energy'][k]:.2f}" for k in ("acc", *METRICS)),
            *(f"{results['paper30'][seed]['ce']['energy'][k]:.2f}" for k in ("fpr95_id",)),
        ]
        for seed, v in sel.items()
    ]
    lines += [
        markdown_table(
            [
                "run",
                "grid",
                "chosen",
                "ID acc",
                "AUROC",
                "FPR95 (ID+)",
                "FPR95 (OOD+)",
                "CE FPR95 (ID+)",
            ],
            rows,
        )
        if rows
        else "(no seed has finished the grid yet)",
        "",
    ]
    if sel:
        lines += [
            "The chosen arm and the estimate itself (`x1`, the 30-epoch UM arm) against the "
            "30-epoch CE control of the same seed:",
            "",
        ]
        paired = {seed: xi_against_ce(results, seed, v["summary"]) for seed, v in sel.items()}
        for scorer in SCORERS:
            lines += comparison(paired, scorer, ("ce", "x1", "chosen"))
    times, kept = finished_times(runs, results, record), results["recorded_only"]
    lines += [
        f"{len(times)} of {sum(len(phase_arms(p, runs)) for p in PHASES)} arms finished; their "
        f"training took {sum(s for s in times.values() if s) / 3600:.2f} h of wall time on 2 "
        "CPU cores.",
        *(
            [
                f"Kept from the earlier tables, no finished run of them in the runs directory: "
                f"{', '.join(kept)} (a finished rerun replaces them).",
            ]
            if kept
            else []
        ),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".md"), "\n".join(lines).encode())
    atomic_write_json(out.with_suffix(".json"), results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/faithful", help="where the arms' runs go")
    p.add_argument("--out", default="benchmarks/results/faithful", help="tables: <out>.md/.json")
    p.add_argument("--phases", default=",".join(PHASES), help="phases to run, in this order")
    p.add_argument(
        "--seeds",
        default=",".join(map(str, SEEDS)),
        help="run the arms of these seeds only (default: all)",
    )
    p.add_argument("--resume", action="store_true", help="continue interrupted arms")
    p.add_argument("--tables-only", action="store_true", help="rebuild the tables and stop")
    p.add_argument(
        "--rerun-recorded",
        default="paper100",
        help="phases whose arms are trained again when only the earlier tables hold them "
        "(default paper100: the demo ships those weights); the others keep their record",
    )
    p.add_argument(
        "--src",
        default=str(SRC),
        help="the unleash_ood source tree the arms run with (a checkout of the study's commit)",
    )
    args = p.parse_args()
    runs, out = Path(args.runs_dir), Path(args.out)
    bench = load_benchmark("fmnist")
    phases, rerun = args.phases.split(","), set(args.rerun_recorded.split(","))
    seeds = {f"seed{s}" for s in args.seeds.split(",")}
    if not seeds <= {f"seed{s}" for s in SEEDS}:
        p.error(f"--seeds takes some of {','.join(map(str, SEEDS))}, not {args.seeds}")
    progressed = not args.tables_only
    while progressed:  # a second pass runs arms whose inputs an arm of a later phase made
        progressed = False
        for phase in phases:
            print(f"phase {phase}", flush=True)
            record = read_record(out)
            for arm in phase_arms(phase, runs, record):
                arm.keep()  # a run that finished before its copy was made
                if arm.done() or arm.name.split("/")[1] not in seeds:
                    continue
                if kept_as_recorded(arm, record, rerun):
                    print(f"  keep {arm.name}: recorded in {out.with_suffix('.json')}", flush=True)
                elif run_arm(arm, args.resume, Path(args.src).resolve()):
                    arm.keep()
                    progressed = True
                    write_tables(runs, out, bench)
    write_tables(runs, out, bench)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
