"""The likelihood score test with an EKFAC Fisher (Choi, Yoon, Bae, Kang, 2021, "Robust
Out-of-Distribution Detection on Deep Probabilistic Generative Models"; the version the authors
released last, shinypond/ood_detection ``code/core/ekfac_VAE.py``, ``fisher_utils_VAE.py``
``Calculate_fisher_VAE_ekfac`` / ``Calculate_score_VAE_ekfac`` and ``FINAL_TEST_VAE.ipynb``'s
``ekfac(max)``).

For each selected layer (a convolution or linear map of the VAE's encoder), with ``G`` an
image's gradient of the negative ELBO with respect to the layer's weight, its bias appended as
a last column:

1. K-FAC's factors on ID training images: ``A`` the second moment of the layer's inputs (the
   unfolded patches of a convolution, with a constant 1 for the bias) and ``B`` that of the
   gradients at its outputs, over every position; their eigenvectors ``U_A``, ``U_B`` (George
   et al., 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
   Eigenbasis").
2. The Fisher's diagonal in that eigenbasis: ``S = mean_i (U_B^T G_i U_A)^2`` over the same
   images.
3. The layer's statistic ``sum (U_B^T G U_A)^2 / (S + 1e-8)``, standardised by its mean and
   standard deviation over the same ID images; the test statistic is the largest standardised
   value over the layers (``ekfac(max)``), and the score is minus it (higher = more ID-like).

Deviations from the authors' code:
- The factors, ``S`` and the standardisation come from the first ``samples`` ID training
  images (default 1,000); their notebook's run draws 10 shuffled images. Their running average
  gives the first image a weight of 5 % that the second image overwrites, so it leaves their
  ``A`` and ``B`` out; here every image counts. The factors' scale (theirs divides a
  convolution's ``A`` by the squared number of positions and multiplies ``B`` by it) does not
  change the eigenvectors, so it is not kept; the ``1e-12 I`` they add before the
  eigendecomposition is not needed in float64 either.
- The standard deviation is the population one (NumPy's default, as theirs).
- Per-sample gradients come from ``torch.func`` in batches instead of one image per backward
  pass, and the factors from one backward pass per batch (each image's loss depends on its own
  activations only, with the model in evaluation mode): the same values.
- Their VAE is Likelihood Regret's DCGAN VAE with its ``netE``; here the default layers are every
  convolution of this VAE's encoder and its two linear maps to the posterior, the same role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unleash_ood.data.base import ImageSet
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.generative.base import DetectorScore, require_integers
from unleash_ood.generative.score_test import per_sample_gradients
from unleash_ood.generative.vae import VAE, require_plain

EPS = 1e-8  # the authors' guard on S


def select_layers(model: nn.Module, spec: str) -> dict[str, nn.Conv2d | nn.Linear]:
    """The convolutions and linear maps named by ``spec``: module names joined by ``+``, each
    standing for itself and every module under it (``encoder`` = all its layers)."""
    prefixes = [p.strip() for p in spec.split("+") if p.strip()]
    chosen = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
        and any(name == p or name.startswith(p + ".") for p in prefixes)
    }
    for p in prefixes:
        if not any(n == p or n.startswith(p + ".") for n in chosen):
            layers = ", ".join(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
            raise UserError(
                f"score_test_ekfac: no convolution or linear layer at {p!r}; choose module "
                f"names such as encoder, to_mu, {layers}"
            )
    for name, m in chosen.items():
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise UserError(f"score_test_ekfac: {name} is grouped or not zero-padded")
    return chosen


def layer_inputs(layer: nn.Conv2d | nn.Linear, a: torch.Tensor) -> torch.Tensor:
    """``(N, positions, in)`` inputs of ``layer`` as its weight sees them: a convolution's
    unfolded patches (channel-major, as its flattened weight), a 1 appended for a bias."""
    if isinstance(layer, nn.Conv2d):
        a = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        a = a.transpose(1, 2)
    else:
        a = a[:, None, :]
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    return a


def output_gradients(g: torch.Tensor) -> torch.Tensor:
    """``(N, positions, out)`` gradients at a layer's outputs (``(N, out, H, W)`` or
    ``(N, out)``)."""
    return g.flatten(2).transpose(1, 2) if g.ndim == 4 else g[:, None, :]


def weight_gradients(
    layer_name: str, layer: nn.Conv2d | nn.Linear, grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Per-sample ``(N, out, in)`` gradients of a layer, its bias as the last column."""
    g = grads[f"{layer_name}.weight"].flatten(2)
    if layer.bias is not None:
        g = torch.cat([g, grads[f"{layer_name}.bias"][..., None]], 2)
    return g


def eigenbasis(g: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``U_B^T G U_A`` of per-sample gradients ``(N, out, in)``, in float64."""
    return u_out.T @ g.double() @ u_in


def ekfac_statistic(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``sum (U_B^T G U_A)^2 / (S + 1e-8)`` per sample, ``t`` ``(N, out, in)``."""
    return (t.pow(2) / (s + EPS)).sum((1, 2))


@dataclass
class ScoreTestEKFAC(DetectorScore):
    """Minus the largest standardised EKFAC score statistic over ``layers`` (module names
    joined by ``+``), fitted on the first ``samples`` ID training images."""

    layers: str = "encoder+to_mu+to_logvar"
    samples: int = 1000
    batch_size: int = 50
    name: ClassVar[str] = "score_test_ekfac"
    kinds: ClassVar[tuple[str, ...]] = ("vae",)
    requires_fit: ClassVar[bool] = True
    bases_: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, init=False, repr=False
    )
    scale_: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    standard_: dict[str, tuple[float, float]] = field(default_factory=dict, init=False, repr=False)

    def check(self, model: VAE) -> None:
        require_plain(model, self.name)
        require_integers(self.name, 2, samples=self.samples)
        require_integers(self.name, 1, batch_size=self.batch_size)
        if not isinstance(self.layers, str):
            raise UserError(
                f"score_test_ekfac: layers are module names joined by +; got {self.layers!r}"
            )
        select_layers(model, self.layers)

    def _param_names(self, model: VAE) -> list[str]:
        return [
            f"{name}.{p}"
            for name, layer in select_layers(model, self.layers).items()
            for p in ("weight", "bias")
            if getattr(layer, p) is not None
        ]

    def _rotated(self, model: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's per-sample gradients in its Kronecker eigenbasis."""
        assert self.bases_ is not None
        grads = per_sample_gradients(model, x, self._param_names(model))
        out = {}
        for name, layer in select_layers(model, self.layers).items():
            u_in, u_out = self.bases_[name]
            out[name] = eigenbasis(weight_gradients(name, layer, grads), u_out, u_in)
        return out

    def _factors(
        self, model: VAE, x: torch.Tensor, layers: dict[str, nn.Module]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Summed ``a a^T`` and ``g g^T`` of one batch, per layer, in float64."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                inputs[name], outputs[name] = args[0].detach(), out

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
        try:
            with torch.enable_grad():
                loss = model(x).sum()
                grads = torch.autograd.grad(loss, [outputs[n] for n in layers])
        finally:
            for h in handles:
                h.remove()
        out = {}
        for (name, layer), g in zip(layers.items(), grads, strict=True):
            a = layer_inputs(layer, inputs[name]).flatten(0, 1).double()
            g = output_gradients(g).flatten(0, 1).double()
            out[name] = (a.T @ a, g.T @ g)
        return out

    def fit(
        self, model: VAE, train: ImageSet, device: torch.device, progress: bool = False
    ) -> ScoreTestEKFAC:
        """Kronecker eigenbases, the diagonal ``S`` in them and the statistic's mean and
        standard deviation, from the first ``samples`` ID training images (three passes)."""
        self.check(model)
        model.eval()
        layers = select_layers(model, self.layers)
        data = train.subset(torch.arange(min(self.samples, len(train))))

        def batches(desc: str):
            return tqdm(
                (to_device(x, device) for x, _ in data.batches(self.batch_size)),
                total=-(-len(data) // self.batch_size),
                desc=f"score_test_ekfac {desc}",
                leave=False,
                disable=not progress,
            )

        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for x in batches("factors"):
            for name, (aa, gg) in self._factors(model, x, layers).items():
                sums[name] = (sums[name][0] + aa, sums[name][1] + gg) if name in sums else (aa, gg)
        self.bases_ = {
            name: (torch.linalg.eigh(aa).eigenvectors, torch.linalg.eigh(gg).eigenvectors)
            for name, (aa, gg) in sums.items()
        }
        second: dict[str, torch.Tensor] = {}
        for x in batches("eigenbasis diagonal"):
            for name, t in self._rotated(model, x).items():
                second[name] = second.get(name, 0) + t.pow(2).sum(0)
        self.scale_ = {name: s / len(data) for name, s in second.items()}
        stats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        for x in batches("standardisation"):
            for name, t in self._rotated(model, x).items():
                stats[name].append(ekfac_statistic(t, self.scale_[name]))
        self.standard_ = {}
        for name, parts in stats.items():
            values = torch.cat(parts)
            std = values.std(correction=0).item()
            if not std > 0:
                raise UserError(
                    f"score_test_ekfac: {name}'s statistic is constant over the ID images; "
                    f"leave it out of layers"
                )
            self.standard_[name] = (values.mean().item(), std)
        return self

    def score_batch(self, model: VAE, x: torch.Tensor) -> torch.Tensor:
        if self.bases_ is None:
            raise UserError("score_test_ekfac must be fit on ID training images before scoring")
        standardised = [
            (ekfac_statistic(t, self.scale_[name]) - self.standard_[name][0])
            / self.standard_[name][1]
            for name, t in self._rotated(model, x).items()
        ]
        return -torch.stack(standardised).amax(0)
