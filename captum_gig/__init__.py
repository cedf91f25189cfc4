"""captum_gig: mechanistic interpretability of image models with Generalized Integrated Gradients."""

from ._version import __version__
from .concepts import BisectingSphericalKMeans, ConceptBasis, batchnorm_offset
from .decompose import DecompositionScore, PFVDecomposer, alpha_max
from .gig import GeneralizedIntegratedGradients
from .graph import ConceptGraph
from .metrics import l0_ratio, relative_l2
from .pfv import PFVSet, collect_pfvs
from .preactivation import expose_preactivations, remove_preactivations

__all__ = [
    "__version__",
    "BisectingSphericalKMeans",
    "ConceptBasis",
    "ConceptGraph",
    "DecompositionScore",
    "GeneralizedIntegratedGradients",
    "PFVDecomposer",
    "PFVSet",
    "alpha_max",
    "batchnorm_offset",
    "collect_pfvs",
    "expose_preactivations",
    "l0_ratio",
    "relative_l2",
    "remove_preactivations",
]
