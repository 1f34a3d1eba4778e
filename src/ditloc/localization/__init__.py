"""Localization: which blocks of a DiT carry a concept. The package's modules keep their names
(`ditloc.localization.search`, `ditloc.localization.presence`); the functions `ditloc.localize`,
`ditloc.presence` and `ditloc.localization.search.search` are reached by name.

- `methods`: `localize`, every method by name;
- `scores`: block scores on the ordinary sampling trajectory (`contribution`, `patch`,
  `attribution`);
- `presence`: the concept's presence under sets of withheld blocks;
- `search`: the set-level causal search over block sets, K from its curve;
- `judge`: the model as its own judge of a concept's presence (the search's `self` objective);
- `result`: `Localization`, the one result type every caller reads.
"""

from .methods import METHODS, localize
from .presence import (
    OBJECTIVES,
    PresenceRunner,
    SetPresence,
    default_evaluator,
)
from .result import AUTO_K_DROP, Localization, SetSearch, nan_to_none, none_to_nan, ranking_of, score_mass_k
from .scores import block_scores
from .search import SearchConfig

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
    "nan_to_none",
    "none_to_nan",
    "ranking_of",
    "score_mass_k",
]
