"""Tuning on validation data only, the ranking of scorers, and their command-line side."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from test_cli import run
from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.data.base import ImageSet
from unleash_ood.errors import UserError
from unleash_ood.evaluate import Evaluation, Evaluator, evaluate
from unleash_ood.report import plot_ranking, ranking_markdown
from unleash_ood.scores import make_scorer
from unleash_ood.tune import GRIDS, check_grid, parse_grids, tune_scorers, validation_view


class UnreadableSet(ImageSet):
    """A test set that fails the test if anything reads it."""

    def __len__(self) -> int:
        raise AssertionError(f"{self.name} was read")

    def batches(self, *args, **kwargs):
        raise AssertionError(f"{self.name} was read")

    __getitem__ = __getitems__ = batches


def poisoned(benchmark):
    """The benchmark with every test set made unreadable."""
    sealed = {n: UnreadableSet(n, d.images, d.labels) for n, d in benchmark.ood_test.items()}
    id_test = UnreadableSet("id_test", benchmark.id_test.images, benchmark.id_test.labels)
    return dataclasses.replace(benchmark, id_test=id_test, ood_test=sealed)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]


GRID = {"knn": {"k": (1, 5, 20)}, "react": {"percentile": (50.0, 90.0)}}


def test_tuning_never_reads_a_test_set(model, tiny_benchmark) -> None:
    searcher = Evaluator(
        model, validation_view(poisoned(tiny_benchmark)), [], "cpu", progress=False
    )
    tuned, report = tune_scorers(searcher, [make_scorer("knn"), make_scorer("react")], GRID)
    assert [s.name for s in tuned] == ["knn", "react"]
    assert set(report) == {"knn", "react"}
    with pytest.raises(ValueError, match="validation_view"):
        tune_scorers(Evaluator(model, tiny_benchmark, [], "cpu", progress=False), tuned, GRID)


def test_tuning_takes_the_best_validation_auroc(model, tiny_benchmark) -> None:
    result = evaluate(
        model, tiny_benchmark, "knn,msp", device="cpu", progress=False, tune=True, grids=GRID
    )
    aurocs = [
        evaluate(
            model, tiny_benchmark, [make_scorer("knn", k=k)], ("val",), device="cpu", progress=False
        ).row("knn", split="val")["auroc"]
        for k in GRID["knn"]["k"]
    ]
    chosen = result.tuning["knn"]
    assert chosen["params"] == {"k": GRID["knn"]["k"][int(np.argmax(aurocs))]}
    assert chosen["val_auroc"] == pytest.approx(max(aurocs))
    assert chosen["grid"] == {"k": [1, 5, 20]}
    assert "msp" not in result.tuning  # nothing to tune
    assert result.to_dict()["tuning"] == result.tuning
    # The reported test rows are those of the chosen value.
    k = chosen["params"]["k"]
    plain = evaluate(model, tiny_benchmark, [make_scorer("knn", k=k)], device="cpu", progress=False)
    assert result.row("knn") == plain.row("knn")


def test_default_grids_are_valid() -> None:
    for name, grid in GRIDS.items():
        check_grid(name, grid)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("knn:k=0/5", "knn: k must be"), ("knn:kk=5", "knn has no parameter kk"),
     ("knn:k", "bad grid"), ("knn:k=a/5", "must be numbers"), ("nope:k=1", "unknown scorer")],
)  # fmt: skip
def test_bad_grids(spec, message) -> None:
    with pytest.raises(UserError, match=message):
        for name, grid in parse_grids(spec).items():
            check_grid(name, grid)


def test_parse_grids() -> None:
    assert parse_grids("knn:k=10/50, vra:low=40:high=90/95") == {
        "knn": {"k": (10, 50)},
        "vra": {"low": (40,), "high": (90, 95)},
    }


def fake_evaluation() -> Evaluation:
    rows = [
        {"split": "test", "scorer": s, "dataset": "mean", "auroc": a, "fpr95_id": f,
         "fpr95_ood": f, "aupr_in": a, "aupr_out": a, "detection_error": 0.1}
        for s, a, f in (("msp", 0.8, 0.5), ("ash_s", 0.12, 0.99), ("knn", 0.95, 0.2))
    ]  # fmt: skip
    return Evaluation("b", {"id_test": 0.9}, rows)


def test_ranking_flags_scorers_below_chance_and_averages_leave_them_out(tmp_path) -> None:
    ev = fake_evaluation()
    assert [r["scorer"] for r in ev.ranking()] == ["knn", "msp", "ash_s"]
    assert [r["below_chance"] for r in ev.ranking()] == [False, False, True]
    assert ev.sound_scorers() == ["knn", "msp"]
    table = ranking_markdown(ev)
    assert "| 3 | ash_s (below chance) | 12.00 | 99.00 |" in table
    assert "| 1 | knn | 95.00 |" in table
    plot_ranking(ev, tmp_path / "ranking.png")
    assert (tmp_path / "ranking.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_tune_reports_choices_beside_test_metrics(
    capsys, fmnist_dir, tiny_checkpoint, tmp_path
):
    out_dir = tmp_path / "tuned"
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(fmnist_dir)]
    args += ["--scores", "knn,msp", "--out", str(out_dir), "--device", "cpu", "--no-progress"]
    code, out, err = run(capsys, *args, "--tune", "--grid", "knn:k=1/5")
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    k = metrics["tuning"]["knn"]["params"]["k"]
    assert k in (1, 5) and f"| knn | k={k} |" in (out_dir / "metrics.md").read_text()
    assert "tuned on validation" in out and f"k={k}" in out
    assert (out_dir / "ranking.png").exists()
    fresh = [a if a != str(out_dir) else str(tmp_path / "bad") for a in args]
    code, _, err = run(capsys, *fresh, "--tune", "--grid", "knn:k=0")
    assert code != 0 and "knn: k must be" in err
    code, _, err = run(capsys, *fresh, "--grid", "knn:k=1")
    assert code != 0 and "add --tune" in err
    assert not (tmp_path / "bad").exists()
