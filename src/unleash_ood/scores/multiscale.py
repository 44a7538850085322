"""MODE's cross-scale decision: k-NN over global and local vectors of the last feature map.

Zhang, Gao, Hao, Huang, Song and Shen, "From Global to Local: Multi-scale Out-of-distribution
Detection", IEEE Transactions on Image Processing 2023; code: github.com/JimZAI/MODE-OOD
(``feature_collect.py``, ``CSD.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range, neighbour_count_problem
from unleash_ood.scores.distance import knn_distance
from unleash_ood.scores.neighbours import bank_rows
from unleash_ood.scores.stats import block_map

# Vectors per image: the four quadrants, the whole map and its centre (``region_vectors``).
SCALES = 6


@dataclass
class MODE(Scorer):
    """``max_s -||z_s(x) - NN_k(z_s(x), B)||``: the best, over six scales, of the negative
    distance to the ``k``-th nearest bank vector, all vectors L2-normalised.

    The scales ``z_s(x)`` are averages of the last feature map before pooling over its four
    quadrants, the whole map and its central window (:func:`~unleash_ood.models.maps.
    region_vectors`). The bank ``B`` holds every scale of every ID training image together
    (``6 N`` vectors), as in their ``CSD.py``, so a local query may match any scale of any
    training image. Default ``k = 10``, their value. ``bank_fraction`` keeps the vectors of
    evenly spaced training images only (all six scales of each): 1, the whole set, is theirs;
    the bank is six times the training set, so the search costs 36 times KNN's at 1.

    How the map reaches the scorer: the evaluator asks the model for its last feature map only
    when a scorer lists a map summary, and :class:`~unleash_ood.outputs.Outputs` keeps the six
    pooled vectors per image (``N x 6 x D``, six times the features), never the map. We chose
    this over scoring batch by batch like a gradient scorer because the bank must be built from
    the ID training images anyway, so the vectors are computed in the one forward pass per
    dataset that every other scorer shares (and can be cached), and the same mechanism serves
    the other feature-map scorers.

    Deviations from the authors' code: the central window of an ``H x W`` map is rows and
    columns ``[H // 4, H - H // 4)`` (their fixed ``[1:3]`` of a 4 x 4 map, the same there);
    distances are Euclidean where their faiss index returns squared ones (the same ranking);
    the k-NN search is exact and runs in tiles (:func:`~unleash_ood.scores.distance.
    knn_distance`). Their attention-based fine-tuning (ALPA) is a training objective, not part
    of this score: ``unleash finetune --method alpa`` (:mod:`unleash_ood.method.alpa`); the
    score runs on whichever model it is given.
    """

    name = "mode"
    requires_fit = True
    map_summaries = ("regions",)
    k: int = 10
    bank_fraction: float = 1.0
    bank_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self, "k", 1, integer=True, include_low=True)
        check_range(self, "bank_fraction", 0, 1, include_high=True)

    def fit_problem(self, n: int) -> str | None:
        vectors = len(bank_rows(n, self.bank_fraction)) * SCALES
        return neighbour_count_problem(self.k, vectors, "ID training vectors")

    def fit(self, train: Outputs, head: nn.Linear) -> MODE:
        regions = train.summary("regions", self.name)
        self.check_fit_size(len(regions))
        regions = regions[bank_rows(len(regions), self.bank_fraction)]
        self.bank_ = F.normalize(regions.reshape(-1, regions.shape[-1]).float(), dim=1)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()

        def best_scale(regions: torch.Tensor) -> torch.Tensor:
            queries = F.normalize(regions.reshape(-1, regions.shape[-1]).float(), dim=1)
            distances = knn_distance(queries, self.bank_, self.k).view(len(regions), -1)
            return -distances.min(dim=1).values

        return block_map(best_scale, outputs.summary("regions", self.name))
