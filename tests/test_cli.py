"""End-to-end tests of the ``unleash`` commands on small generated data."""

import json
from importlib.metadata import version

import pytest

from unleash_ood.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_datasets_lists_everything_with_availability(capsys, fmnist_dir) -> None:
    code, out, _ = run(capsys, "datasets", "--data-dir", str(fmnist_dir))
    assert code == 0
    assert "| fashion-mnist | 70,000 |" in out and str(fmnist_dir) in out
    assert "| fmnist | yes |" in out
    assert "bundled-test/letters" in out
    assert "| bundled-aux/outliers | 10,200 |" in out


def test_evaluate_writes_run_directory(capsys, fmnist_dir, tiny_checkpoint, tmp_path) -> None:
    """Three scorers here; every scorer through the command: the README's `--scores all`
    example, in tests/test_readme.py."""
    out_dir = tmp_path / "eval"
    scorers = ("msp", "energy", "knn")
    code, out, err = run(
        capsys,
        "evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data-dir",
        str(fmnist_dir),
        "--scores",
        ",".join(scorers),
        "--splits",
        "val,test",
        "--out",
        str(out_dir),
        "--device",
        "cpu",
        "--no-progress",
    )
    assert code == 0, err
    assert {p.name for p in out_dir.iterdir()} >= {
        "metrics.json",
        "metrics.md",
        "metrics.csv",
        "histograms.png",
        "ranking.png",
        "config.json",
    }
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {r["scorer"] for r in metrics["rows"]} == set(scorers)
    assert {r["split"] for r in metrics["rows"]} == {"val", "test"}
    assert "scorers by mean AUROC" in out and "| 1 |" in out and f"| {len(scorers)} |" in out
    assert "FPR95 (ID+)" in out and "FPR95 (OOD+)" in out
    csv_lines = (out_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("split,scorer,dataset,auroc,fpr95_id,fpr95_ood")
    assert (out_dir / "histograms.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scores", "msp,nope"], "unknown scorer 'nope'"),
        (["--benchmark", "imagenet9"], "unknown benchmark 'imagenet9'"),
        (["--data-dir", "EMPTY"], "Fashion-MNIST not found (tried"),
        (["--checkpoint", "MISSING"], "no checkpoint at"),
    ],
)
def test_bad_input_fails_cleanly(
    capsys, monkeypatch, fmnist_dir, tiny_checkpoint, tmp_path, argv, message
) -> None:
    monkeypatch.setattr("unleash_ood.data.base.SYSTEM_DATA_ROOTS", ())
    out_dir = tmp_path / "never"
    base = {"--checkpoint": str(tiny_checkpoint), "--data-dir": str(fmnist_dir)}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = {"EMPTY": str(tmp_path), "MISSING": str(tmp_path / "x")}.get(value, value)
    args = [a for kv in base.items() for a in kv]
    code, _, err = run(
        capsys, "evaluate", *args, "--out", str(out_dir), "--device", "cpu", "--no-progress"
    )
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_version_is_the_installed_distribution_s(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"unleash-ood {version('unleash-ood')}\n"
