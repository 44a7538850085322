"""The model shipped inside the package loads and reaches its recorded test accuracy."""

import pytest

from unleash_ood.checkpoint import load_checkpoint, read_sidecar
from unleash_ood.data import fmnist
from unleash_ood.data.base import SYSTEM_DATA_ROOTS
from unleash_ood.demo import shipped_checkpoint
from unleash_ood.evaluate import forward_outputs
from unleash_ood.metrics import accuracy


def test_sidecar_records_recipe_and_accuracy() -> None:
    meta = read_sidecar(shipped_checkpoint())
    assert meta["architecture"] == "cnn" and meta["num_classes"] == 10
    assert meta["recipe"]["seed"] == 0 and meta["epoch"] == meta["recipe"]["epochs"]
    assert 0.9 < meta["metrics"]["id_test_acc"] < 1.0


@pytest.mark.skipif(
    fmnist.locate(SYSTEM_DATA_ROOTS) is None,
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_reaches_recorded_test_accuracy() -> None:
    model, meta = load_checkpoint(shipped_checkpoint(), "cpu", 10, (1, 28, 28))
    test = fmnist.load_split(fmnist.locate(SYSTEM_DATA_ROOTS), "test")
    acc = accuracy(forward_outputs(model, test).logits, test.labels)
    assert acc == pytest.approx(meta["metrics"]["id_test_acc"], abs=1e-4)
