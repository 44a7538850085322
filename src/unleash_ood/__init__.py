"""unleash-ood: out-of-distribution detection for image classifiers.

Built around *Unleashing Mask* (Zhu et al., ICML 2023): post-hoc scores, the UM/UMAP
fine-tuning methods and outlier exposure, with metrics in the field's conventions.
"""

from unleash_ood.metrics import ood_metrics
from unleash_ood.outputs import Outputs

__all__ = ["Outputs", "ood_metrics"]
__version__ = "0.1.0"
