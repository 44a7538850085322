"""UMAP (Unleashing Mask Adopt Pruning): the learned-mask layers live in
:mod:`unleash_ood.models.masked` (model surgery, below every method); this module keeps the
earlier import path."""

from unleash_ood.models.masked import (
    MaskedConv2d,
    MaskedLinear,
    TopKMask,
    apply_umap,
    export_dense,
    kept_count,
    mask_sparsity,
    score_parameters,
)

__all__ = [
    "MaskedConv2d",
    "MaskedLinear",
    "TopKMask",
    "apply_umap",
    "export_dense",
    "kept_count",
    "mask_sparsity",
    "score_parameters",
]
