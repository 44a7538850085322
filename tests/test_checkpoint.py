import json
from pathlib import Path

import pytest
import torch

from unleash_ood.checkpoint import (
    checkpoint_paths,
    checkpoints_in,
    load_checkpoint,
    model_spec,
    read_sidecar,
    save_checkpoint,
)
from unleash_ood.errors import UserError
from unleash_ood.models import create_model


def _model(**kw):
    torch.manual_seed(0)
    return create_model(
        "cnn", num_classes=10, in_channels=1, mean=(0.3,), std=(0.4,), width=4, **kw
    ).eval()


def test_round_trip_gives_identical_logits(tmp_path) -> None:
    model = _model()
    save_checkpoint(
        tmp_path / "m",
        model,
        model_spec(model, "cnn", 28, {"width": 4}),
        recipe={"lr": 0.1},
        epoch=3,
    )
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert meta["epoch"] == 3 and meta["recipe"] == {"lr": 0.1}
    assert meta["mean"] == pytest.approx([0.3]) and meta["input_size"] == 28


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "m", model, model_spec(model, "cnn", 28, {"width": 4}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_wrong_class_count_and_shape_refused(tmp_path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "m", model, model_spec(model, "cnn", 28, {"width": 4}))
    with pytest.raises(UserError, match="predicts 10 classes but the data has 100"):
        load_checkpoint(tmp_path / "m", num_classes=100)
    with pytest.raises(UserError, match=r"takes 1x28x28 input.*use a checkpoint trained on"):
        load_checkpoint(tmp_path / "m", input_shape=(3, 32, 32))
    save_checkpoint(
        tmp_path / "b", model, model_spec(model, "cnn", 28, {"width": 4}), benchmark="tiny"
    )
    with pytest.raises(UserError, match="trained on benchmark 'tiny': pass --benchmark"):
        load_checkpoint(tmp_path / "b", num_classes=100)


def test_sidecar_of_other_architecture_refused(tmp_path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "m", model, model_spec(model, "cnn", 28, {"width": 4}))
    _, sidecar = checkpoint_paths(tmp_path / "m")
    meta = json.loads(sidecar.read_text())
    meta["model_kwargs"] = {"width": 8}
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not fit architecture 'cnn'"):
        load_checkpoint(tmp_path / "m")


def test_missing_and_damaged_files(tmp_path) -> None:
    with pytest.raises(UserError, match="no checkpoint at"):
        read_sidecar(tmp_path / "nothing")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(tmp_path / "bad")
    model = _model()
    (tmp_path / "bad.json").write_text(
        json.dumps({"format": "unleash-ood/1", **model_spec(model, "cnn", 28, {"width": 4})})
    )
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad")


def test_pickle_file_is_never_loaded(tmp_path) -> None:
    """A torch.save pickle under the weights name is rejected, not unpickled."""
    model = _model()
    save_checkpoint(tmp_path / "m", model, model_spec(model, "cnn", 28, {"width": 4}))
    torch.save(model.state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "m")


def test_a_folder_is_not_a_checkpoint(tmp_path) -> None:
    for folder in (Path("/"), Path("."), tmp_path / ".."):
        with pytest.raises(UserError, match="is a folder, not a checkpoint; pass a checkpoint's"):
            checkpoint_paths(folder)
    with pytest.raises(UserError, match="is a folder, not a checkpoint; pass a checkpoint's"):
        load_checkpoint(tmp_path)
    model = _model()
    spec = model_spec(model, "cnn", 28, {"width": 4})
    save_checkpoint(tmp_path / "checkpoints" / "last", model, spec)
    save_checkpoint(tmp_path / "checkpoints" / "final", model, spec)
    with pytest.raises(UserError, match=f"pass {tmp_path / 'checkpoints' / 'final'}$"):
        read_sidecar(tmp_path)


def test_missing_checkpoint_names_what_its_folder_holds(tmp_path) -> None:
    model = _model()
    spec = model_spec(model, "cnn", 28, {"width": 4})
    for name in ("epoch_001", "last"):
        save_checkpoint(tmp_path / name, model, spec)
    (tmp_path / "half.json").write_text("{}")  # no weights: not a checkpoint
    with pytest.raises(UserError, match=r"holds last, epoch_001; pass one of them, e\.g\. .*last$"):
        read_sidecar(tmp_path / "final")
    assert checkpoints_in(tmp_path) == ["last", "epoch_001"]
    with pytest.raises(UserError, match=r"or a shipped model: .*fmnist_cnn"):
        read_sidecar("no_such_model")
