"""Built-in architectures, the registry, and the HeadSplit adapter."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchvision
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models import (
    MODELS,
    Classifier,
    DenseNetBC,
    HeadSplit,
    ResNet18,
    SmallCNN,
    ViT,
    WideResNet,
    create_model,
    model_names,
)

# name, cheap options, feature dimension with those options
BUILTINS = [
    ("cnn", {"width": 8}, 32),
    ("resnet18", {"width": 16}, 128),
    ("wrn40_2", {}, 128),
    ("densenet100", {}, 342),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "options", "dim"), BUILTINS)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_builtin_shapes_and_split(name: str, options: dict, dim: int, channels: int, size: int):
    model = create_model(name, num_classes=7, in_channels=channels, **options).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        features, logits = model.features(x), model(x)
    assert isinstance(model, Classifier)
    assert features.shape == (2, dim) and model.feature_dim == dim
    assert logits.shape == (2, 7) and model.num_classes == 7
    assert torch.equal(logits, model.head(features))
    assert model.input_mean.shape == (1, channels, 1, 1)


@pytest.mark.parametrize(
    ("name", "options", "low", "high", "dim"),
    [
        ("resnet18", {}, 11.1e6, 11.3e6, 512),  # 11,173,962 in the CIFAR ResNet-18 literature
        ("resnet18", {"width": 16}, 0.65e6, 0.75e6, 128),
        ("wrn40_2", {}, 2.2e6, 2.3e6, 128),  # 2.24M as in Outlier Exposure
        ("densenet100", {}, 0.75e6, 0.80e6, 342),  # 0.77M as in Huang et al. / ODIN
        ("densenet_bc_100", {}, 0.75e6, 0.80e6, 342),
    ],
)
def test_parameter_counts(name: str, options: dict, low: float, high: float, dim: int):
    model = create_model(name, num_classes=10, **options)
    assert low <= n_params(model) <= high
    assert model.feature_dim == dim


def test_densenet_takes_the_official_non_affine_batchnorm():
    # tmlr-group/Unleashing-Mask, configs: bn_type NonAffineBatchNorm
    plain = create_model("densenet100", 10, bn_affine=False)
    bns = [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.weight is None and m.track_running_stats for m in bns)
    affine = create_model("densenet100", 10)
    assert n_params(affine) - n_params(plain) == sum(2 * m.num_features for m in bns)
    with pytest.raises(UserError, match="bn_affine takes true or false"):
        create_model("densenet100", 10, bn_affine="no")


def test_registry_lists_and_builds_classes():
    names = ["cnn", "densenet100", "resnet18", "vit", "wrn40_2"]
    assert model_names() == sorted(MODELS) == names
    expected = {"cnn": SmallCNN, "resnet18": ResNet18, "wrn40_2": WideResNet, "vit": ViT}
    expected |= {"densenet100": DenseNetBC, "densenet_bc_100": DenseNetBC}
    cheap = {name: options for name, options, _ in BUILTINS}
    for name, cls in expected.items():
        assert type(create_model(name, 3, **cheap.get(name, {}))) is cls


def test_registry_pins_the_named_architecture():
    wrn = create_model("wrn40_2", 10, drop_rate=0.0)
    assert all(block.drop_rate == 0.0 for block in wrn.blocks)
    assert len(wrn.blocks) == 18  # (40 - 4) / 6 = 6 blocks per stage
    assert MODELS["wrn40_2"].options() == ["drop_rate"]


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown model 'resnet19'.*cnn, densenet100, resnet18"):
        create_model("resnet19", 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet18", {"widht": 8}, r"does not accept widht; its options are: width=64"),
        ("wrn40_2", {"depth": 28}, r"does not accept depth; its options are: drop_rate=0.3"),
        (
            "densenet100",
            {"bottleneck": False},
            r"growth_rate=12, reduction=0.5, drop_rate=0.0",
        ),
    ],
)
def test_unknown_option_names_the_accepted_ones(name: str, kwargs: dict, message: str):
    with pytest.raises(UserError, match=message):
        create_model(name, 10, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "option width takes a positive integer (default 32), not 0"),
        ({"width": "abc"}, "option width takes a positive integer (default 32), not 'abc'"),
        ({"width": 2.5}, "option width takes a positive integer (default 32), not 2.5"),
        ({"width": True}, "option width takes a positive integer (default 32), not True"),
    ],
)
def test_option_values_of_the_wrong_kind_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        create_model("cnn", 10, **kwargs)
    with pytest.raises(UserError, match=r"drop_rate takes a finite number >= 0 \(default 0.3\)"):
        create_model("wrn40_2", 10, drop_rate=float("nan"))
    create_model("wrn40_2", 10, drop_rate=0)  # an integer where a float is expected


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="3 input channels"):
        create_model("resnet18", 10, mean=(0.5,), width=4)
    with pytest.raises(UserError, match="num_classes"):
        create_model("cnn", 0)
    with pytest.raises(UserError, match="6n \\+ 4"):
        WideResNet(depth=41)
    with pytest.raises(UserError, match="6n \\+ 4"):
        DenseNetBC(depth=99)


def test_checkpoint_round_trip_by_name():
    """A state dict loads strictly into a model rebuilt from the same name and options."""
    for name, options in [("resnet18", {"width": 8}), ("torchvision:mobilenet_v3_small", {})]:
        source = create_model(name, 5, **options).eval()
        rebuilt = create_model(name, 5, **options).eval()
        rebuilt.load_state_dict(source.state_dict(), strict=True)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(source(x), rebuilt(x))


# --- HeadSplit --------------------------------------------------------------------------------


def unwrapped_logits(model: nn.Module, split: HeadSplit, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model((x - split.input_mean) / split.input_std)


def test_headsplit_resnet18_is_bit_identical():
    original = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    split = HeadSplit(copy.deepcopy(original), head="fc", input_size=(3, 32, 32)).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = split(x), split.features(x)
    assert torch.equal(logits, unwrapped_logits(original, split, x))
    assert features.shape == (3, 512) and split.num_classes == 7
    assert isinstance(split.model.fc, nn.Identity)
    # The head lives once, as ``head``: no duplicate weights in checkpoints.
    assert "head.weight" in split.state_dict() and "model.fc.weight" not in split.state_dict()


def test_headsplit_dotted_head_name():
    original = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).eval()
    split = HeadSplit(copy.deepcopy(original), head="classifier.3", input_size=(3, 32, 32)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(split(x), unwrapped_logits(original, split, x))
    assert split.feature_dim == 1024


def test_headsplit_keeps_input_gradients_and_train_modes():
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    model.bn1.eval()  # e.g. a frozen BatchNorm: the probe must not switch it back to train
    split = HeadSplit(model, head="fc", input_size=(3, 32, 32))
    assert split.model.training and not split.model.bn1.training
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    split(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_headsplit_rejects_non_linear_and_missing_heads():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    with pytest.raises(
        UserError,
        match=r"'classifier.2' .* is a Dropout, not an nn.Linear.*"
        r"classifier.3",
    ):
        HeadSplit(model, head="classifier.2")
    with pytest.raises(UserError, match=r"no module named 'fc'.*classifier.0, classifier.3"):
        HeadSplit(model, head="fc")
    with pytest.raises(UserError, match=r"no nn\.Linear layer"):
        HeadSplit(nn.Sequential(nn.Conv2d(3, 2, 1)), head="0")


def test_headsplit_detects_work_after_the_head():
    after_head = nn.Sequential(nn.Flatten(), nn.Linear(12, 12), nn.Softmax(dim=1))
    with pytest.raises(UserError, match="does something after the head"):
        HeadSplit(after_head, head="1", mean=(0.0,), std=(1.0,), input_size=(3, 2, 2))
    # Without a probe, a shape change after the head is still caught at the first forward.
    reshaped = HeadSplit(
        nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Unflatten(1, (-1, 1))),
        head="1",
        mean=(0.0,),
        std=(1.0,),
    )
    with pytest.raises(UserError, match=r"not features of shape \(N, 12\)"):
        reshaped(torch.rand(2, 3, 2, 2))


class FakeTimm(nn.Module):
    """The timm contract: ``forward = forward_head(forward_features(x))``, where
    ``forward_head(x, pre_logits=True)`` stops at the head's input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.pre_logits_calls = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        if pre_logits:
            self.pre_logits_calls += 1
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_headsplit_timm_style_uses_pre_logits():
    original = FakeTimm().eval()
    split = HeadSplit(copy.deepcopy(original), head="head", input_size=(3, 8, 8)).eval()
    assert split.timm_style
    x = torch.rand(2, 3, 8, 8)
    calls = split.model.pre_logits_calls
    with torch.no_grad():
        assert torch.equal(split(x), unwrapped_logits(original, split, x))
    assert split.model.pre_logits_calls == calls + 1


# --- torchvision through the registry ---------------------------------------------------------


def test_torchvision_by_name_finds_the_head():
    model = create_model("torchvision:resnet18", num_classes=6)
    assert isinstance(model, HeadSplit) and model.head_name == "fc"
    assert torch.allclose(model.input_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert create_model("torchvision:mobilenet_v3_small", 6).head_name == "classifier.3"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("torchvision:resnet19", {}, r"unknown torchvision classifier 'resnet19'.*resnet18"),
        ("torchvision:resnet18", {"in_channels": 1}, "3-channel input"),
        ("torchvision:resnet18", {"widht": 2}, "rejected its arguments.*widht"),
        ("torchvision:squeezenet1_1", {}, "no nn.Linear head"),
    ],
)
def test_torchvision_errors(name: str, kwargs: dict, message: str):
    with pytest.raises(UserError, match=message):
        create_model(name, 10, **kwargs)
