"""ALPA, the training objective of MODE: attention-based local propagation on the last map.

Zhang, Gao, Hao, Huang, Song and Shen, "From Global to Local: Multi-scale Out-of-distribution
Detection", IEEE Transactions on Image Processing 2023; code: github.com/JimZAI/MODE-OOD
(``ALPA/attention.py``, ``ALPA/losses.py``, ``ALPA/main_cl.py``, ``ALPA/util.py``). MODE's
test-time score is :class:`~unleash_ood.scores.multiscale.MODE`; ALPA fine-tunes the model so
that the regions of its last feature map, which that score compares, are discriminative.

For the last feature map of each image, its ``P = H x W`` positions are tokens ``t_i`` of
``D`` channels. Three projectors (``Linear(D, D) - ReLU - Linear(D, d)``, no biases) give
queries ``q_i``, keys ``k_i`` and values ``v_i`` of ``d`` dimensions. Image ``j``'s values
aligned to image ``i``'s positions are ``A_ij = softmax(q_i k_j^T / sqrt(d)) v_j`` (``P x d``),
``c_ij = mean_p cos(v_i[p], A_ij[p])``, and the pair's similarity is symmetric,
``s_ij = c_ij + c_ji`` (in [-2, 2]). The loss is the supervised contrastive loss of these
similarities at inverse temperature ``tau``:

    L_ALPA = mean_i  -1/|P(i)| sum_{j in P(i)} [tau s_ij - log sum_{k != i} exp(tau s_ik)],

``P(i)`` the other images of ``i``'s class in the batch (an anchor with none adds 0 and still
counts in the mean, as theirs). A fine-tune minimises ``CE(head(pool(map)), y) + lambda
L_ALPA`` from one forward pass; the projectors are the objective's own parameters, trained by
the same SGD (learning rate and weight decay) as the model, saved in the train state for
``--resume`` and dropped from the final model (the score does not use them, as in their CSD).

Defaults are theirs: ``tau = 10`` (``--temperature_s``), ``d = 80`` (``--feat_dim``),
``lambda = 1``, mean aggregation over positions, no attention dropout; their ALPA-finetune
runs from a CE-trained model for 500 epochs of batch 128 at lr 0.1 (cosine), momentum 0.9,
weight decay 1e-4, the ``paper`` recipe of ``--method alpa`` here.

Cost: the pairwise alignment takes memory and time ``O(N^2 P (P + d))`` for a batch of ``N``,
as theirs (their ``N`` is twice the batch: two views). One step at batch 128 on the shipped
Fashion-MNIST CNN (a 7 x 7 map of 128 channels) takes about 9 s and 3.5 GB on one CPU
thread, against 0.2 s for CE: a GPU job at the paper's length.

Deviations from the authors' code:

* the global term is the cross-entropy of the model's own head on the pooled map. Their
  ALPA-finetune drops every global term (``loss = 0`` plus ALPA, ``lam`` forced to 1) and
  their joint training adds ALPA to SupCon; a classifier here keeps its head, which the other
  scorers read, so the head trains on with the features it classifies;
* one augmented view per image (the recipe's ``--augment``) where they contrast two crops of
  each image (SupCon's colour-jitter pipeline, each image also its own positive); positives
  are therefore the other images of the class in the batch;
* their cosine schedule ends at ``lr / 1000``; ours (``--schedule cosine``) ends at 0;
* the projectors start from the named stream ``alpa-attention`` with ``nn.Linear``'s own
  distribution, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; their hidden width is fixed at 512
  (ResNet's last map), ours is the model's ``D``;
* one process only: under ``torchrun`` each process would contrast its own shard with
  unsynchronised projectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models import Classifier
from unleash_ood.rng import torch_generator
from unleash_ood.train import Objective


def projector(channels: int, dim: int) -> nn.Sequential:
    """``Linear(channels, channels) - ReLU - Linear(channels, dim)``, without biases."""
    return nn.Sequential(
        nn.Linear(channels, channels, bias=False), nn.ReLU(), nn.Linear(channels, dim, bias=False)
    )


class AttentionSimilarity(nn.Module):
    """The pairwise similarity ``s_ij = c_ij + c_ji`` of the feature maps of a batch, through
    cross-attention alignment of their positions (see the module docstring)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.dim = dim
        self.query = projector(channels, dim)
        self.key = projector(channels, dim)
        self.value = projector(channels, dim)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """``nn.Linear``'s initial distribution, drawn from ``generator``."""
        with torch.no_grad():
            for p in self.parameters():
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(N, N)`` similarities of the maps ``(N, D, H, W)``."""
        tokens = fmap.flatten(2).transpose(1, 2)  # N x P x D
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)
        scores = q[:, None] @ k[None].transpose(-1, -2) / math.sqrt(self.dim)  # N x N x P x P
        aligned = scores.softmax(-1) @ v[None]  # [i, j]: j's values at i's positions
        c = F.cosine_similarity(v[:, None], aligned, dim=-1).mean(-1)
        return c + c.T


def local_contrastive_loss(
    similarity: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The supervised contrastive loss of ``(N, N)`` similarities at inverse temperature
    ``temperature``: positives are the other samples of the anchor's class; an anchor without
    one contributes 0 to the mean over anchors."""
    n = len(labels)
    others = ~torch.eye(n, dtype=torch.bool, device=similarity.device)
    positive = (labels[:, None] == labels[None]) & others
    logits = temperature * similarity
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_norm = torch.logsumexp(logits.masked_fill(~others, -math.inf), dim=1, keepdim=True)
    log_prob = logits - log_norm
    count = positive.sum(1).clamp(min=1)
    per_anchor = (log_prob * positive).sum(1) / count
    return -per_anchor.mean()


def check_alpa_model(model: nn.Module) -> None:
    """Refuse a model whose last feature map ALPA cannot read."""
    if not (isinstance(model, Classifier) and model.exposes_map()):
        raise UserError(
            f"--method alpa needs the model's last feature map, which {type(model).__name__} "
            f"does not expose; fine-tune a built-in convolutional model"
        )


class AlpaObjective(Objective):
    """``CE + weight * L_ALPA`` on the last feature map, with its projectors as the
    objective's own parameters (trained, and saved for ``--resume``)."""

    def __init__(
        self,
        channels: int,
        weight: float = 1.0,
        temperature: float = 10.0,
        dim: int = 80,
        seed: int = 0,
    ):
        self.weight, self.temperature = weight, temperature
        self.attention = AttentionSimilarity(channels, dim)
        self.attention.reset_parameters(torch_generator(seed, "alpa-attention"))

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        if world > 1:
            raise UserError("--method alpa trains on one process; drop torchrun")

    def named_parameters(self):
        return self.attention.named_parameters(prefix="attention")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"alpa/{k}": p.detach() for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(state[f"alpa/{k}"])

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        features, fmap = net.features_with_map(x)
        logits = net.head(features)
        local = local_contrastive_loss(self.attention(fmap), y, self.temperature)
        return F.cross_entropy(logits, y) + self.weight * local, logits
