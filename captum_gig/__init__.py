"""captum_gig: mechanistic interpretability of image models with Generalized Integrated Gradients."""

from ._version import __version__
from .atlas import ConceptAtlas, concept_localisation, draw_localisation
from .concepts import BisectingSphericalKMeans, ConceptBasis, batchnorm_offset
from .decompose import DecompositionScore, PFVDecomposer, alpha_max
from . import extractors  # registers the "kmeans", "dictionary" and "sae" extractors
from .gig import GeneralizedIntegratedGradients
from . import distributed
from .baselines import ConceptAblation, ConceptGradientXCoefficient, ConceptMagnitude
from .aggregate import ClassAttribution, class_attribution, interlayer_attribution
from .graph import ConceptGraph
from .diagnostics import ConceptDiagnostics, concept_diagnostics
from .ierf import IERFResult, ierf, receptive_fields
from .metrics import (
    Curve,
    InterlayerCurves,
    concept_deletion,
    concept_insertion,
    interlayer_deletion,
    interlayer_insertion,
    l0_ratio,
    relative_l2,
)
from .pfv import PFVSet, collect_pfvs
from .preactivation import expose_preactivations, remove_preactivations

__all__ = [
    "__version__",
    "BisectingSphericalKMeans",
    "ClassAttribution",
    "ConceptAblation",
    "ConceptGradientXCoefficient",
    "ConceptMagnitude",
    "ConceptAtlas",
    "ConceptBasis",
    "ConceptDiagnostics",
    "ConceptGraph",
    "Curve",
    "InterlayerCurves",
    "DecompositionScore",
    "GeneralizedIntegratedGradients",
    "IERFResult",
    "PFVDecomposer",
    "PFVSet",
    "alpha_max",
    "batchnorm_offset",
    "class_attribution",
    "collect_pfvs",
    "concept_diagnostics",
    "distributed",
    "interlayer_attribution",
    "concept_localisation",
    "draw_localisation",
    "concept_deletion",
    "concept_insertion",
    "interlayer_deletion",
    "interlayer_insertion",
    "expose_preactivations",
    "ierf",
    "l0_ratio",
    "relative_l2",
    "receptive_fields",
    "remove_preactivations",
]
