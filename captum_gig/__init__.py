"""captum_gig: mechanistic interpretability of image models with Generalized Integrated Gradients."""

from ._version import __version__
from .atlas import ConceptAtlas, concept_localisation, draw_localisation
from .concepts import BisectingSphericalKMeans, ConceptBasis, batchnorm_offset
from .decompose import DecompositionScore, PFVDecomposer, alpha_max
from .gig import GeneralizedIntegratedGradients
from . import distributed
from .aggregate import ClassAttribution, class_attribution, interlayer_attribution
from .graph import ConceptGraph
from .ierf import IERFResult, ierf, receptive_fields
from .metrics import l0_ratio, relative_l2
from .pfv import PFVSet, collect_pfvs
from .preactivation import expose_preactivations, remove_preactivations

__all__ = [
    "__version__",
    "BisectingSphericalKMeans",
    "ClassAttribution",
    "ConceptAtlas",
    "ConceptBasis",
    "ConceptGraph",
    "DecompositionScore",
    "GeneralizedIntegratedGradients",
    "IERFResult",
    "PFVDecomposer",
    "PFVSet",
    "alpha_max",
    "batchnorm_offset",
    "class_attribution",
    "collect_pfvs",
    "distributed",
    "interlayer_attribution",
    "concept_localisation",
    "draw_localisation",
    "expose_preactivations",
    "ierf",
    "l0_ratio",
    "relative_l2",
    "receptive_fields",
    "remove_preactivations",
]
