"""The family-free engine: contribution math, runtime state, instrumentation.

Nothing here knows a model family; adapters (`ditloc.adapters`) supply the
processors and the per-forward context.
"""

from .causal import CAUSAL_METHODS, METHODS, CausalProbe
from .contribution import CHUNK_ELEMENTS, CONTRIBUTION_TERMS, chunk_elements_for, concept_contribution
from .instrument import instrument
from .kernels import sdpa_with_lse
from .state import CrossSwap, ForwardContext, JointSwap, Probe, Session, StepSwaps, StopForward, Swap

__all__ = [
    "CAUSAL_METHODS",
    "METHODS",
    "CausalProbe",
    "CHUNK_ELEMENTS",
    "CONTRIBUTION_TERMS",
    "CrossSwap",
    "ForwardContext",
    "JointSwap",
    "Probe",
    "Session",
    "StepSwaps",
    "StopForward",
    "Swap",
    "chunk_elements_for",
    "concept_contribution",
    "instrument",
    "sdpa_with_lse",
]
