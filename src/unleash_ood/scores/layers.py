"""Multi-layer Mahalanobis: class-conditional Gaussians on the channel means of every stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, require_labels
from unleash_ood.scores.stats import block_map, class_means, shared_covariance, squared_mahalanobis


@dataclass
class LayerMahalanobis(Scorer):
    """``-sum_l min_c (m_l - mu_lc)^T S_l^+ (m_l - mu_lc) / a_l``: the Mahalanobis score of
    Lee, Lee, Lee and Shin ("A Simple Unified Framework for Detecting Out-of-Distribution
    Samples and Adversarial Attacks", NeurIPS 2018; code:
    github.com/pokaxpoka/deep_Mahalanobis_detector) on every stage of the network, summed:
    its feature ensemble.

    ``m_l`` is the channel mean of the map at the end of stage ``l`` (``Classifier.
    forward_stages``: each resolution of the built-in models, as their code takes the end of
    each ResNet / DenseNet block), ``mu_lc`` its class means and ``S_l`` its covariance shared
    by the classes, on the labelled ID training set; ``S_l^+`` is a float64 pseudo-inverse.

    Deviations: the paper weighs the layers by a logistic regression fitted on OOD (or
    adversarial) validation samples and perturbs the input first (ODIN-style noise tuned the
    same way); we use no OOD data, so every layer's squared distance is divided by its mean
    ``a_l`` over the ID training samples and the layers weigh equally, and the input is not
    perturbed. Wrapped models (``HeadSplit``) expose their last map only, where this is the
    single-layer ``mahalanobis`` on channel means.
    """

    name = "mahalanobis_layers"
    requires_fit = True
    map_summaries = ("stage_means",)
    means_: torch.Tensor | None = field(default=None, init=False, repr=False)
    precisions_: torch.Tensor | None = field(default=None, init=False, repr=False)
    scales_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> LayerMahalanobis:
        require_labels(self, train)
        stages = train.summary("stage_means", self.name)
        means, precisions = [], []
        for layer in range(stages.shape[1]):
            x = stages[:, layer]
            classes, mu = class_means(x, train.labels)
            covariance = shared_covariance(x, train.labels, classes, mu)
            means.append(mu)
            precisions.append(torch.linalg.pinv(covariance, hermitian=True))
        self.means_, self.precisions_ = torch.stack(means), torch.stack(precisions)
        self.scales_ = self._layer_distances(stages).mean(dim=0).clamp_min(1e-12)
        return self

    def _layer_distances(self, stages: torch.Tensor) -> torch.Tensor:
        """``(N, L)``: each stage's squared distance to its closest class mean."""
        layers = list(zip(self.means_, self.precisions_, strict=True))

        def closest(x: torch.Tensor) -> torch.Tensor:
            per_layer = [
                squared_mahalanobis(x[:, i].double(), mu, precision).min(dim=1).values
                for i, (mu, precision) in enumerate(layers)
            ]
            return torch.stack(per_layer, dim=1)

        return block_map(closest, stages)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        stages = outputs.summary("stage_means", self.name)
        return -(self._layer_distances(stages) / self.scales_).sum(dim=1)
