"""The one table type of reports and benchmarks (:class:`ResultsTable`) and its Markdown.

It imports nothing of the library, so the evaluator, the reports and the benchmark scripts all
share it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` (population std, as over a fixed set of runs), the value alone for one
    run, ``-`` for none."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class ResultsTable:
    """The one table type of reports and benchmarks: rows of results (one dict per run, model,
    scorer, ...), selected, averaged over runs and written as Markdown, CSV or JSON.

    ``mean`` keeps every value it averages, so a Markdown cell can say ``mean ± std`` over the
    runs and the JSON loses nothing.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def select(self, **where: Any) -> ResultsTable:
        """The rows whose column equals the value given (or is in it, for a tuple/list/set)."""

        def keep(row: dict) -> bool:
            return all(
                row.get(k) in v if isinstance(v, tuple | list | set) else row.get(k) == v
                for k, v in where.items()
            )

        return ResultsTable([r for r in self.rows if keep(r)])

    def column(self, name: str) -> list[Any]:
        return [r[name] for r in self.rows]

    def mean(self, by: Sequence[str], values: Sequence[str]) -> ResultsTable:
        """One row per distinct ``by`` combination, in first-seen order: ``n`` (its rows) and,
        for each column in ``values``, the list of its values (a cell shows mean ± std)."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault(tuple(r[k] for k in by), []).append(r)
        return ResultsTable(
            [
                {**dict(zip(by, key, strict=True)), "n": len(rows)}
                | {v: [r[v] for r in rows if r.get(v) is not None] for v in values}
                for key, rows in groups.items()
            ]
        )

    def to_markdown(self, columns: Mapping[str, str], digits: int = 2) -> str:
        """A Markdown table of ``columns`` (column -> header): numbers with ``digits``
        decimals, averaged cells (lists) as ``mean ± std``."""

        def cell(value: Any) -> str:
            if isinstance(value, list):
                return mean_std(value, digits)
            if isinstance(value, float):
                return f"{value:.{digits}f}"
            return "-" if value is None else str(value)

        rows = [[cell(r.get(c)) for c in columns] for r in self.rows]
        return markdown_table(list(columns.values()), rows)

    def to_csv(self, columns: Sequence[str] | None = None) -> str:
        columns = list(columns or dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ResultsTable:
        """The table :meth:`to_json` wrote (or any ``{"rows": [{...}, ...]}``)."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError('a results table is a JSON object {"rows": [{...}, ...]}')
        if not all(isinstance(r, dict) for r in data["rows"]):
            raise ValueError("every row of a results table is a JSON object")
        return cls(data["rows"])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
