"""The Unleashing Mask methods (Zhu et al., ICML 2023): fine-tuning under the UM loss
constraint, and UMAP, which learns a pruning mask over the frozen pretrained weights.

Importing the package registers every outlier-exposure method (``OUTLIER_OBJECTIVES``): OE and
Energy-OE in ``outliers``, POEM, DOE, WOODS and SCONE in their own modules. MODE's ALPA
fine-tuning objective is in ``alpa``.
"""

from unleash_ood.method.alpa import AlpaObjective
from unleash_ood.method.constraint import (
    UMObjective,
    XiEstimate,
    estimate_loss_constraint,
    um_loss,
)
from unleash_ood.method.doe import Doe
from unleash_ood.method.outliers import OUTLIER_OBJECTIVES, OutlierObjective
from unleash_ood.method.poem import Poem
from unleash_ood.method.wild import WildObjective
from unleash_ood.models.masked import (
    MaskedConv2d,
    MaskedLinear,
    TopKMask,
    apply_umap,
    export_dense,
    mask_sparsity,
    score_parameters,
)

__all__ = [
    "OUTLIER_OBJECTIVES",
    "AlpaObjective",
    "Doe",
    "MaskedConv2d",
    "MaskedLinear",
    "OutlierObjective",
    "Poem",
    "TopKMask",
    "UMObjective",
    "WildObjective",
    "XiEstimate",
    "apply_umap",
    "estimate_loss_constraint",
    "export_dense",
    "mask_sparsity",
    "score_parameters",
    "um_loss",
]
