"""The one results table: select, mean over runs, Markdown / CSV / JSON."""

from __future__ import annotations

import csv
import io

import pytest

from unleash_ood.tables import ResultsTable, mean_std

ROWS = [
    {"model": "ce", "seed": 0, "auroc": 90.0, "fpr": 30.0},
    {"model": "ce", "seed": 1, "auroc": 92.0, "fpr": 34.0},
    {"model": "um", "seed": 0, "auroc": 95.0, "fpr": 20.0},
    {"model": "um", "seed": 1, "auroc": 97.0, "fpr": None},
]


def test_mean_std_by_hand() -> None:
    assert mean_std([90.0, 92.0]) == "91.00 ± 1.00"  # population std over the runs
    assert mean_std([3.14159], digits=3) == "3.142"
    assert mean_std([]) == "-"


def test_select_and_mean() -> None:
    table = ResultsTable(ROWS)
    assert table.select(model="um").column("seed") == [0, 1]
    assert table.select(seed=(1,), model={"ce", "um"}).column("auroc") == [92.0, 97.0]
    means = table.mean(by=["model"], values=["auroc", "fpr"])
    assert means.rows == [
        {"model": "ce", "n": 2, "auroc": [90.0, 92.0], "fpr": [30.0, 34.0]},
        {"model": "um", "n": 2, "auroc": [95.0, 97.0], "fpr": [20.0]},  # missing values skipped
    ]
    md = means.to_markdown({"model": "model", "n": "runs", "auroc": "AUROC", "fpr": "FPR95"})
    assert md.splitlines() == [
        "| model | runs | AUROC | FPR95 |",
        "|---|---|---|---|",
        "| ce | 2 | 91.00 ± 1.00 | 32.00 ± 2.00 |",
        "| um | 2 | 96.00 ± 1.00 | 20.00 |",
    ]


def test_csv_and_json_round_trip() -> None:
    table = ResultsTable(ROWS)
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert rows[1] == {"model": "ce", "seed": "1", "auroc": "92.0", "fpr": "34.0"}
    assert ResultsTable.from_json(table.to_json()).rows == ROWS
    with pytest.raises(ValueError, match="JSON object"):
        ResultsTable.from_json("[1, 2]")
    with pytest.raises(ValueError, match="every row"):
        ResultsTable.from_json('{"rows": [1]}')


def test_an_evaluation_is_a_results_table(tiny_benchmark, tiny_checkpoint) -> None:
    from unleash_ood.checkpoint import load_checkpoint
    from unleash_ood.evaluate import evaluate

    model, _ = load_checkpoint(tiny_checkpoint)
    ev = evaluate(model, tiny_benchmark, "msp,energy")
    table = ev.table()
    assert table.select(split="test", dataset="mean", scorer="energy").rows == [ev.row("energy")]
