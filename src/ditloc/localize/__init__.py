"""Localize: which blocks of a DiT carry a concept.

- `methods`: `localize`, every method by name;
- `scores`: block scores on the ordinary sampling trajectory (`contribution`, `patch`,
  `attribution`; method.md §1, §7);
- `presence`: the concept's presence under sets of withheld blocks (§9);
- `search`: the set-level causal search over block sets, K from its curve (§9);
- `judge`: the model as its own judge of a concept's presence (the search's `self` objective);
- `result`: `Localization`, the one result type every caller reads.
"""

from .methods import METHODS, localize
from .presence import (
    OBJECTIVES,
    PresenceRunner,
    SetPresence,
    default_evaluator,
    presence,
)
from .result import AUTO_K_DROP, Localization, SetSearch, score_mass_k
from .scores import block_scores
from .search import SearchConfig, search

__all__ = [
    "AUTO_K_DROP",
    "METHODS",
    "OBJECTIVES",
    "Localization",
    "PresenceRunner",
    "SearchConfig",
    "SetPresence",
    "SetSearch",
    "block_scores",
    "default_evaluator",
    "localize",
    "presence",
    "score_mass_k",
    "search",
]
