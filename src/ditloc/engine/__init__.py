"""The family-free engine: contribution math, runtime state, instrumentation.

Nothing here knows a model family; adapters (`ditloc.adapters`) supply the
processors and the per-forward context.
"""

from .causal import CAUSAL_METHODS, METHODS, CausalProbe
from .contribution import CHUNK_ELEMENTS, VARIANTS, concept_contribution, sdpa_with_lse
from .instrument import instrument
from .state import CrossSwap, ForwardContext, JointSwap, Probe, Session

__all__ = [
    "CAUSAL_METHODS",
    "METHODS",
    "CausalProbe",
    "CHUNK_ELEMENTS",
    "VARIANTS",
    "CrossSwap",
    "ForwardContext",
    "JointSwap",
    "Probe",
    "Session",
    "concept_contribution",
    "instrument",
    "sdpa_with_lse",
]
