"""Every bad input through the command line: exit code 2, one line on stderr that says what to
do, and the output folder untouched (absent, or exactly as it was)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import fake_fashion, write_idx
from unleash_ood.cli import main

CPU = ["--device", "cpu"]


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_checkpoint, fmnist_dir) -> dict[str, str]:
    """Damaged checkpoints, data folders and run directories, made once."""
    root = tmp_path_factory.mktemp("broken")
    paths: dict[str, str] = {}
    meta = json.loads(tiny_checkpoint.with_suffix(".json").read_text())

    def checkpoint(name: str, sidecar) -> None:
        shutil.copy(tiny_checkpoint.with_suffix(".safetensors"), root / f"{name}.safetensors")
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (root / f"{name}.json").write_text(text)
        paths[name] = str(root / name)

    checkpoint("list", [1, 2, 3])
    checkpoint("nokey", {k: v for k, v in meta.items() if k != "num_classes"})
    checkpoint("negwidth", {**meta, "model_kwargs": {"width": -3}})
    checkpoint("strclasses", {**meta, "num_classes": "10"})
    checkpoint("format", {**meta, "format": "other/9"})
    checkpoint("notjson", "{not json")
    checkpoint("fiveclass", {**meta, "num_classes": 5})
    checkpoint("nanmean", {**meta, "mean": [float("nan")]})
    (root / "dirsidecar.json").mkdir()
    shutil.copy(tiny_checkpoint.with_suffix(".safetensors"), root / "dirsidecar.safetensors")
    paths["dirsidecar"] = str(root / "dirsidecar")
    shutil.copy(tiny_checkpoint.with_suffix(".json"), root / "truncated.json")
    data = tiny_checkpoint.with_suffix(".safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    paths["truncated"] = str(root / "truncated")

    def data_dir(name: str, edit) -> None:
        folder = root / name / "fashion-mnist"
        shutil.copytree(fmnist_dir / "fashion-mnist", folder)
        edit(folder)
        paths[name] = str(root / name)

    def truncate(folder: Path) -> None:
        f = folder / "train-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[:200])

    def mismatch(folder: Path) -> None:
        write_idx(folder / "train-labels-idx1-ubyte.gz", fake_fashion(1000, 0)[1])

    def rank(folder: Path) -> None:
        write_idx(folder / "train-images-idx3-ubyte.gz", fake_fashion(1200, 0)[0][:, :, 0])

    def big_label(folder: Path) -> None:
        labels = fake_fashion(1200, 0)[1].copy()
        labels[5] = 12
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels)

    def not_gzip(folder: Path) -> None:
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"plain bytes, not gzip")

    def bad_magic(folder: Path) -> None:
        with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x0d\x01" + np.uint32(300).byteswap().tobytes() + bytes(300))

    for name, edit in [
        ("truncated_idx", truncate),
        ("count_mismatch", mismatch),
        ("wrong_rank", rank),
        ("label_too_big", big_label),
        ("not_gzip", not_gzip),
        ("bad_dtype", bad_magic),
    ]:
        data_dir(name, edit)
    (root / "a_file").write_text("x")
    paths["a_file"] = str(root / "a_file")
    paths["under_file"] = str(root / "a_file" / "out")  # a folder that cannot be made
    run = root / "finished_eval"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "config.json").write_text('{"command": "evaluate"}')
    paths["finished_eval"] = str(run)
    started = root / "no_xi"  # a pretraining run, which finetune --resume cannot continue
    (started / "checkpoints").mkdir(parents=True)
    (started / "config.json").write_text('{"command": "pretrain"}')
    paths["no_xi"] = str(started)
    foreign = root / "project"  # someone else's folder, with a config.json of its own
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    (foreign / "notes.txt").write_text("mine")
    paths["foreign"] = str(foreign)
    empty_run = root / "empty_run"
    empty_run.mkdir()
    paths["empty_run"] = str(empty_run)
    trained = root / "trained_run" / "checkpoints"
    trained.mkdir(parents=True)
    for ext in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoint.with_suffix(ext), trained / f"last{ext}")
    paths["trained_run"] = str(trained.parent)
    return paths


# (command line with placeholders, words the one error line must contain)
# {ckpt}: a good checkpoint, {out}: a fresh output folder, {missing} / {nowhere}: paths that
# do not exist, {b_NAME}: a damaged file or folder from the fixture above. The small
# Fashion-MNIST is the data unless the line names its own --data-dir.
CASES = [
    # evaluate
    ("evaluate --checkpoint {ckpt} --scores msp,nope --out {out}", "unknown scorer 'nope'"),
    ("evaluate --checkpoint {ckpt} --benchmark imagenet9 --out {out}", "unknown benchmark"),
    ("evaluate --checkpoint {missing} --out {out}", "no checkpoint at"),
    ("evaluate --checkpoint {ckpt} --batch-size 0 --out {out}", "--batch-size"),
    ("evaluate --checkpoint {ckpt} --splits train --out {out}", "unknown split 'train'"),
    ("evaluate --checkpoint {ckpt} --out {b_a_file}", "is a file"),
    ("evaluate --checkpoint {ckpt} --out {b_finished_eval}", "already holds results"),
    ("evaluate --checkpoint {ckpt} --out {b_under_file}", "cannot write"),
    ("evaluate --checkpoint {ckpt} --out {b_foreign}", "did not write (config.json)"),
    ("pretrain --out {b_foreign}", "holds files this library did not write"),
    ("finetune --from {ckpt} --out {b_foreign}", "choose a new or empty folder"),
    ("watermark --from {ckpt} --out {b_foreign}", "did not write"),
    ("detector train --kind vae --out {b_foreign}", "did not write"),
    ("evaluate --checkpoint {ckpt} --cache {b_a_file} --out {out}", "--cache"),
    ("evaluate --checkpoint {ckpt} --cache /proc/no-cache --out {out}", "choose a --cache folder"),
    ("evaluate --checkpoint {ckpt} --scores energy:temperature=abc --out {out}", "temperature"),
    ("evaluate --checkpoint {ckpt} --scores knn:k=0 --out {out}", "k"),
    ("evaluate --checkpoint {ckpt} --scores knn:k=99999 --out {out}", "knn: k=99999 is larger"),
    ("evaluate --checkpoint {ckpt} --scores energy:nope=1 --out {out}", "nope"),
    ("evaluate --checkpoint {ckpt} --device cuda --out {out}", "CUDA is not available"),
    ("evaluate --checkpoint {ckpt} --device tpu9 --out {out}", "unknown device"),
    ("evaluate --checkpoint {b_list} --out {out}", "not a checkpoint sidecar"),
    ("evaluate --checkpoint {b_nokey} --out {out}", "num_classes"),
    ("evaluate --checkpoint {b_negwidth} --out {out}", "model cannot be built: model 'cnn'"),
    ("evaluate --checkpoint {b_strclasses} --out {out}", "num_classes"),
    ("evaluate --checkpoint {b_format} --out {out}", "not an unleash-ood checkpoint"),
    ("evaluate --checkpoint {b_notjson} --out {out}", "not valid JSON"),
    ("evaluate --checkpoint {b_fiveclass} --out {out}", "predicts 5 classes"),
    ("evaluate --checkpoint {b_nanmean} --out {out}", "mean"),
    ("evaluate --checkpoint {b_dirsidecar} --out {out}", "no checkpoint at"),
    ("evaluate --checkpoint {b_truncated} --out {out}", "not a readable safetensors"),
    ("evaluate --checkpoint . --out {out}", ". is a folder, not a checkpoint"),
    ("evaluate --checkpoint {b_empty_run} --out {out}", "is a folder, not a checkpoint"),
    ("finetune --from {b_trained_run} --out {out}", "trained_run/checkpoints/last"),
    ("evaluate --checkpoint {ckpt} --data-dir {nowhere} --out {out}", "does not exist"),
    ("evaluate --checkpoint {ckpt} --data-dir {b_truncated_idx} --out {out}", "damaged"),
    ("evaluate --checkpoint {ckpt} --data-dir {b_count_mismatch} --out {out}", "labels"),
    ("evaluate --checkpoint {ckpt} --data-dir {b_wrong_rank} --out {out}", "IDX"),
    ("evaluate --checkpoint {ckpt} --data-dir {b_label_too_big} --out {out}", "label"),
    ("evaluate --checkpoint {ckpt} --data-dir {b_not_gzip} --out {out}", "not an IDX file"),
    ("evaluate --checkpoint {ckpt} --data-dir {b_bad_dtype} --out {out}", "IDX"),
    ("evaluate --checkpoint {ckpt} --grid knn:k=5 --out {out}", "--grid"),
    ("evaluate --checkpoint {ckpt} --scores msp --tune --grid knn:k=5 --out {out}", "--scores"),
    ("evaluate --checkpoint {ckpt} --bogus-flag --out {out}", "see 'unleash evaluate --help'"),
    ("evaluate --out {out}", "--checkpoint"),
    ("evaluate --checkpoint {ckpt} --fit-samples 100 --seed -1 --out {out}", "--seed"),
    # pretrain
    ("pretrain --lr nan --out {out}", "--lr must be a finite number > 0"),
    ("pretrain --lr -1 --out {out}", "--lr must be a finite number > 0"),
    ("pretrain --momentum -0.5 --out {out}", "--momentum"),
    ("pretrain --weight-decay nan --out {out}", "--weight-decay"),
    ("pretrain --epochs 0 --out {out}", "--epochs must be a positive integer"),
    ("pretrain --batch-size 0 --out {out}", "--batch-size must be a positive integer"),
    ("pretrain --save-every 0 --out {out}", "--save-every"),
    ("pretrain --schedule linear --out {out}", "unknown schedule"),
    ("pretrain --augment rotate --out {out}", "unknown augmentation"),
    ("pretrain --model nope --out {out}", "nope"),
    ("pretrain --model-arg width=abc --out {out}", "width"),
    ("pretrain --model-arg width --out {out}", "key=value"),
    ("pretrain --model-arg depth=3 --out {out}", "depth"),
    ("pretrain --model-arg width=0 --out {out}", "width takes a positive integer"),
    ("pretrain --label-noise 1.5 --out {out}", "--label-noise"),
    ("pretrain --label-noise nan --out {out}", "--label-noise"),
    ("pretrain --train-size 0 --out {out}", "--train-size: expected a positive integer"),
    ("pretrain --train-size 999999 --out {out}", "larger than the training set"),
    ("pretrain --batch-size 5000 --out {out}", "smaller than one batch"),
    ("pretrain --resume --out {out}", "drop --resume"),
    ("pretrain --track --eval-batch-size 0 --out {out}", "--eval-batch-size"),
    ("pretrain --track --scores nope --out {out}", "unknown scorer"),
    ("pretrain --out {b_a_file}", "is a file"),
    ("pretrain --out {b_under_file}", "cannot write"),
    ("pretrain --device cuda --out {out}", "CUDA is not available"),
    # finetune
    ("finetune --from {ckpt} --xi nan --out {out}", "--xi must be a finite number > 0"),
    ("finetune --from {ckpt} --xi inf --out {out}", "--xi must be a finite number > 0"),
    ("finetune --from {ckpt} --xi -1 --out {out}", "--xi must be a finite number > 0"),
    ("finetune --from {ckpt} --xi big --out {out}", "--xi takes estimate, validate or a number"),
    ("finetune --from {ckpt} --loss ce --out {out}", "--loss and --trains go together"),
    ("finetune --from {ckpt} --method um --loss ce --trains mask --out {out}", "not both"),
    ("finetune --from {ckpt} --xi 1e-9 --out {out}", "not above the model's own training loss"),
    ("finetune --from {ckpt} --keep 0 --out {out}", "--keep"),
    ("finetune --from {ckpt} --keep 1.5 --out {out}", "--keep"),
    ("finetune --from {ckpt} --n-masks 0 --out {out}", "--n-masks"),
    ("finetune --from {ckpt} --mask-fraction 1.5 --out {out}", "--mask-fraction"),
    ("finetune --from {ckpt} --xi-grid 1,abc --out {out}", "--xi-grid"),
    ("finetune --from {ckpt} --xi-reduction max --out {out}", "--xi-reduction"),
    ("finetune --from {ckpt} --recipe long --out {out}", "--recipe"),
    ("finetune --from {ckpt} --method nope --out {out}", "--method"),
    ("finetune --from {missing} --out {out}", "no checkpoint at"),
    ("finetune --from {ckpt} --lr nan --out {out}", "--lr must be a finite number > 0"),
    ("finetune --from {ckpt} --outliers oe --aux {missing} --out {out}", "no such file"),
    ("finetune --from {ckpt} --outliers oe --aux-ratio 0 --out {out}", "--aux-ratio"),
    ("finetune --from {ckpt} --outliers oe --aux {b_a_file} --out {out}", "unknown outlier file"),
    ("finetune --from {ckpt} --outliers woods --wild {b_empty_run} --out {out}", "neither image"),
    ("finetune --from {ckpt} --outliers oe --aux / --out {out}", "filesystem root"),
    ("finetune --from {ckpt} --outliers scone --wild-margin nan --out {out}", "--wild-margin"),
    ("finetune --from {ckpt} --outliers oe --aux-size 0 --out {out}", "--aux-size"),
    ("finetune --from {ckpt} --outliers vos --out {out}", "--outliers"),
    ("finetune --from {ckpt} --outliers oe --poem-keep 0 --out {out}", "--poem-keep"),
    ("finetune --from {ckpt} --outliers oe --m-out -5 --out {out}", "belongs to --outliers"),
    ("finetune --from {ckpt} --outliers energy --doe-warmup 0.2 --out {out}", "--doe-warmup"),
    ("finetune --from {ckpt} --resume --out {b_no_xi}", "no xi.json"),
    ("finetune --from {ckpt} --resume --out {out}", "drop --resume"),
    ("finetune --from {b_list} --out {out}", "not a checkpoint sidecar"),
    ("finetune --from {ckpt} --out {b_a_file}", "is a file"),
    # atypical
    ("atypical --from {missing} --out {out}", "no checkpoint at"),
    ("atypical --from {ckpt} --n-masks 0 --out {out}", "--n-masks"),
    ("atypical --from {ckpt} --seed -2 --out {out}", "--seed"),
    ("atypical --from {ckpt} --mask-fraction 0 --out {out}", "--mask-fraction"),
    ("atypical --from {ckpt} --out {b_a_file}", "is a file"),
    ("atypical --from {ckpt} --out {b_finished_eval}", "already holds results"),
    # demo, track, datasets
    ("demo --quick --train --out {out}", "pass one of the two"),
    ("demo --out {b_finished_eval}", "not empty"),
    ("demo --data-dir {nowhere} --out {out}", "does not exist"),
    ("track {b_a_file}", "track: error: RUN "),
    ("track {b_empty_run}", "no epoch checkpoints"),
    ("track {b_empty_run} --scores nope", "unknown scorer"),
    ("datasets --data-dir {nowhere}", "does not exist"),
    # watermark, detector
    ("watermark --from {ckpt} --alpha -1 --out {out}", "--alpha must be a finite number > 0"),
    ("watermark --from {missing} --out {out}", "no checkpoint at"),
    ("detector train --kind vae --model-arg width=0 --out {out}", "width takes a positive"),
    ("detector train --kind vae --top 3 --out {out}", "train: error: unrecognized arguments"),
    ("detector train --kind ama --model-arg spectral_norm=1 --out {out}", "true or false"),
    ("detector train --kind vae --grad-clip -1 --out {out}", "--grad-clip must be >= 0"),
    ("detector evaluate --from {missing} --out {out}", "no checkpoint at"),
    ("detector evaluate --from / --out {out}", "/ is a folder, not a checkpoint"),
    ("detector evaluate --from {missing} --batch-size 0 --out {out}", "a positive integer"),
    ("nosuchcommand", "invalid choice"),
]


def expand(template: str, ckpt: Path, data: Path, out: Path, broken: dict) -> list[str]:
    values = {
        "ckpt": str(ckpt),
        "out": str(out),
        "missing": str(out.parent / "missing"),
        "nowhere": str(out.parent / "nowhere"),
        **{f"b_{k}": v for k, v in broken.items()},
    }
    argv = [a.format(**values) for a in template.split()]
    plain = argv[0] in ("datasets", "nosuchcommand")
    data_flags = [] if plain or "--data-dir" in argv else ["--data-dir", str(data)]
    device = [] if plain or "--device" in argv else CPU
    # progress bars go to stderr too; the one line asked of an error is the message itself
    quiet = [] if plain else ["--no-progress"]
    return [*argv, *data_flags, *device, *quiet]


def test_there_are_many_cases() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize(("template", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(
    capsys, tmp_path, fmnist_dir, tiny_checkpoint, broken, template, words
) -> None:
    out = tmp_path / "out"
    argv = expand(template, tiny_checkpoint, fmnist_dir, out, broken)
    touched = [Path(a) for a in argv if a.startswith(str(tmp_path)) or a in broken.values()]
    before = {p: snapshot(p) for p in touched}
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1, err
    assert words in lines[0], lines[0]
    assert all(snapshot(p) == before[p] for p in touched), "the output folder changed"
    assert not os.path.exists(out) or before.get(out) is not None
