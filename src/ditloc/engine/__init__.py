"""The family-free engine: contribution math, runtime state, instrumentation.

Nothing here knows a model family; adapters (`ditloc.adapters`) supply the
processors and the per-forward context.
"""

from .contribution import CHUNK_ELEMENTS, VARIANTS, concept_contribution, sdpa_with_lse
from .instrument import instrument
from .state import CrossSwap, ForwardContext, JointSwap, Probe, Session

__all__ = [
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
