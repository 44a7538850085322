"""UMAP: edge-popup masks over frozen weights, their gradients, and the dense export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.method.umap import (
    MaskedConv2d,
    MaskedLinear,
    TopKMask,
    apply_umap,
    export_dense,
    mask_sparsity,
    score_parameters,
)
from unleash_ood.models import create_model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which costs ~0.5 s
    per step when another process keeps the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", num_classes=10, in_channels=1, width=4)


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.035, 1.0])
@pytest.mark.parametrize(
    "layer",
    [
        lambda keep: MaskedConv2d(3, 8, 3, keep=keep),
        lambda keep: MaskedConv2d(1, 1, 1, bias=False, keep=keep),
        lambda keep: MaskedLinear(64, 10, keep=keep),
        lambda keep: MaskedLinear(7, 3, keep=keep),
    ],
)
def test_keeps_exactly_k_weights_per_layer(layer, keep: float) -> None:
    m = layer(keep)
    n = m.weight.numel()
    assert int(m.mask().sum()) == max(1, round(keep * n)) == m.k
    assert mask_sparsity(m)[""]["kept"] == m.k


def test_ties_are_broken_by_flattened_index() -> None:
    scores = torch.tensor([[1.0, -2.0, 2.0], [1.0, -1.0, 0.5]])
    assert TopKMask.apply(scores, 3).tolist() == [[1, 1, 1], [0, 0, 0]]
    assert TopKMask.apply(scores, 4).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert TopKMask.apply(torch.zeros(5), 2).tolist() == [1, 1, 0, 0, 0]


def test_topk_backward_is_straight_through() -> None:
    scores = torch.tensor([0.3, -0.1, 0.7], requires_grad=True)
    grad_mask = torch.tensor([1.5, -2.0, 4.0])
    TopKMask.apply(scores, 1).backward(grad_mask)
    assert torch.equal(scores.grad, grad_mask)


def test_score_gradient_matches_hand_computation() -> None:
    # W = [2, -1, 3], s = [0.5, -0.2, -0.9], keep 2 of 3: |s| ranks weights 2 and 0 on top,
    # so m = [1, 0, 1] and for x = [1, 4, -2]: out = 2*1 + 3*(-2) + bias 0.25 = -3.75.
    # loss = out, so dL/dw_eff = x and dL/dm = x * W = [2, -4, -6]; the mask is taken through
    # |s|, so dL/ds = x * W * sign(s) = [2, 4, 6], the pruned weight 1 included.
    layer = MaskedLinear(3, 1, keep=2 / 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0, 3.0]]))
        layer.bias.fill_(0.25)
        layer.scores.copy_(torch.tensor([[0.5, -0.2, -0.9]]))
    x = torch.tensor([[1.0, 4.0, -2.0]])
    out = layer(x)
    assert out.item() == -3.75
    out.sum().backward()
    assert layer.scores.grad.tolist() == [[2.0, 4.0, 6.0]]
    assert layer.weight.grad is None and layer.bias.grad is None


def _backward(model: nn.Module) -> None:
    model.train()
    F.cross_entropy(model(images()), torch.arange(4)).backward()


def test_only_scores_train_by_default() -> None:
    model = apply_umap(tiny_cnn(), seed=0)
    _backward(model)
    scores = {id(p) for p in score_parameters(model)}
    assert len(scores) == 6  # five convolutions and the head
    for name, p in model.named_parameters():
        if id(p) in scores:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # conv weights, head weight and bias, BatchNorm affine parameters
            assert not p.requires_grad and p.grad is None, name


def test_train_weights_trains_everything() -> None:
    model = apply_umap(tiny_cnn(), train_weights=True, seed=0)
    _backward(model)
    for name, p in model.named_parameters():
        assert p.requires_grad and p.grad is not None, name


def test_replaces_every_conv_and_the_head_and_keep_one_is_the_identity() -> None:
    original = tiny_cnn().eval()
    model = apply_umap(copy.deepcopy(original), keep=1.0, seed=0).eval()
    assert isinstance(model.head, MaskedLinear)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, MaskedConv2d) for m in model.modules()) == 5
    x = images()
    assert torch.equal(model(x), original(x))
    assert torch.equal(model.head(model.features(x)), original(x))


def test_rejects_keep_outside_unit_interval() -> None:
    for keep in (0.0, 1.5):
        with pytest.raises(UserError, match="keep"):
            apply_umap(tiny_cnn(), keep=keep)


def test_seed_makes_scores_reproducible() -> None:
    a, b = (score_parameters(apply_umap(tiny_cnn(), seed=3)) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_export_dense_matches_logits_and_loads_into_a_plain_model() -> None:
    masked = apply_umap(tiny_cnn(), keep=0.5, seed=0)
    with torch.no_grad():  # random scores would already do; make the mask visibly non-trivial
        for p in score_parameters(masked):
            p.normal_()
    masked.eval()
    dense = export_dense(masked).eval()
    assert any(isinstance(m, MaskedLinear) for m in masked.modules())  # left intact
    fresh = create_model("cnn", 10, 1, width=4)
    assert list(dense.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(dense.state_dict())
    x = images()
    assert torch.equal(dense(x), masked(x))
    assert torch.equal(fresh.eval()(x), masked(x))

    sparsity = mask_sparsity(masked)
    layers = {"trunk.0", "trunk.4", "trunk.7", "trunk.11", "trunk.14", "head"}
    assert set(sparsity) == layers | {"overall"}
    assert sparsity["overall"]["fraction"] == pytest.approx(0.5, abs=0.01)
    plain = [m for m in dense.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in plain)
    assert zeros == sparsity["overall"]["total"] - sparsity["overall"]["kept"]


def test_masked_state_dict_round_trips() -> None:
    trained = apply_umap(tiny_cnn(seed=0), seed=0)
    with torch.no_grad():
        for p in score_parameters(trained):
            p.mul_(-2).add_(0.1)
    state = trained.state_dict()
    assert "head.scores" in state and "trunk.0.scores" in state
    resumed = apply_umap(tiny_cnn(seed=5), seed=9)
    resumed.load_state_dict(state)
    trained.eval()
    resumed.eval()
    x = images()
    assert torch.equal(resumed(x), trained(x))
    assert mask_sparsity(resumed) == mask_sparsity(trained)


def _masks(model: nn.Module) -> list[torch.Tensor]:
    return [m.mask() for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]


def test_sgd_on_scores_changes_the_mask() -> None:
    model = apply_umap(tiny_cnn(), keep=0.5, seed=0)
    before = _masks(model)
    opt = torch.optim.SGD(score_parameters(model), lr=5.0)
    for _ in range(5):
        opt.zero_grad()
        _backward(model)
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, _masks(model), strict=True))
