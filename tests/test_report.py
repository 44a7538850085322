"""The figures of an evaluation: one histogram panel per scorer and OOD set, sized to fit."""

from __future__ import annotations

import numpy as np
from PIL import Image

from unleash_ood.evaluate import Evaluation
from unleash_ood.report import plot_histograms

DPI = 110  # report.save_figure's resolution


def evaluation(scorers: int, sets: int) -> Evaluation:
    rng = np.random.default_rng(0)
    scores = {
        f"s{i}": {
            "id": rng.normal(size=50),
            **{f"ood{j}": rng.normal(size=30) for j in range(sets)},
        }
        for i in range(scorers)
    }
    scores["s0"]["id"][:] = scores["s0"]["ood0"][0]  # one bin: every score equal
    return Evaluation("fmnist", {"id": 0.9}, scores={"test": scores})


def test_one_row_per_scorer_and_a_column_per_ood_set(tmp_path) -> None:
    plot_histograms(evaluation(scorers=3, sets=4), tmp_path / "h.png")
    assert Image.open(tmp_path / "h.png").size == (round(2.6 * 4 * DPI), round(1.9 * 3 * DPI))


def test_a_figure_with_one_ood_set_is_as_wide_as_its_title(tmp_path) -> None:
    model = "UM fine-tuned (paper recipe) model"
    plot_histograms(evaluation(scorers=1, sets=1), tmp_path / "h.png", model=model)
    title = f"{model} on fmnist: score histograms, ID (test) vs each OOD set"
    assert Image.open(tmp_path / "h.png").size[0] == round(0.07 * len(title) * DPI)
    assert len(title) * 0.07 > 2.6


def test_nothing_is_drawn_without_scores(tmp_path) -> None:
    plot_histograms(Evaluation("fmnist", {"id": 0.9}), tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()
