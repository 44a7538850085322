"""The Unleashing Mask methods (Zhu et al., ICML 2023): fine-tuning under the UM loss
constraint, and UMAP, which learns a pruning mask over the frozen pretrained weights."""

from unleash_ood.method.constraint import (
    UMObjective,
    XiEstimate,
    estimate_loss_constraint,
    um_loss,
)
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
    "MaskedConv2d",
    "MaskedLinear",
    "TopKMask",
    "UMObjective",
    "XiEstimate",
    "apply_umap",
    "estimate_loss_constraint",
    "export_dense",
    "mask_sparsity",
    "score_parameters",
    "um_loss",
]
