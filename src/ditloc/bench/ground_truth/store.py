"""The run directory's JSONL stores: measured conditions and localization records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ...errors import DitlocError
from ...localization import AUTO_K_DROP, nan_to_none, none_to_nan
from ..plan import ConceptPlan
from ..store import ResultStore
from .metrics import auto_k
from .settings import AUTO_K_FRACTION, LOCALIZATIONS_FILE, STORE_FILE, localization_file

# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


def read_conditions(out, screened: dict | None = None) -> dict[tuple[str, str], dict[frozenset, list[float]]]:
    """Every measured condition in the run directory: (category, concept) -> condition -> per-image scores
    (of all its images where a screened condition was completed later). `screened`, if given, is filled
    with ((category, concept), condition) -> the image indices of each condition stopped at its screen."""
    path = Path(out) / STORE_FILE
    found: dict[tuple[str, str], dict[frozenset, list[float]]] = {}
    for n, record in enumerate(ResultStore.read(path), 1):
        try:
            key, blocks, scores = (record["category"], record["concept"]), record["blocks"], record["scores"]
            cond, scores = frozenset(blocks), [float(s) for s in scores]
            have = found.setdefault(key, {})
            if cond in have and len(have[cond]) >= len(scores):
                continue
            have[cond] = scores
            if screened is not None:
                if "screen" in record:
                    if len(record["screen"]) != len(scores):
                        raise ValueError
                    screened[key, cond] = [int(i) for i in record["screen"]]
                else:
                    screened.pop((key, cond), None)
        except (KeyError, TypeError, ValueError):
            raise DitlocError(f"{path}:{n}: not a condition record; move the store away and rerun the same "
                              "command to recompute") from None
    return found


def read_localizations(out) -> dict[tuple[str, str, str], dict]:
    """Every localization's record: (category, concept, method) -> {blocks, scores, auto_k, ...}."""
    path = Path(out) / LOCALIZATIONS_FILE
    found: dict[tuple[str, str, str], dict] = {}
    for n, record in enumerate(ResultStore.read(path), 1):
        try:
            key = (record["category"], record["concept"], record["method"])
            auto = record["auto_k"]  # a search's curve may reach no K (None)
            if len(record["blocks"]) != len(record["scores"]) or not (isinstance(auto, int) or
                                                                       (auto is None and "sets" in record)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DitlocError(f"{path}:{n}: not a localization record; move the store away and rerun the same "
                              "command to rewrite it") from None
        found.setdefault(key, record)
    return found


def _localization_record(c: ConceptPlan, method: str, loc) -> dict:
    record = {"category": c.category, "concept": c.concept, "method": method,
              "file": localization_file(c.category, c.slug, method), "blocks": list(loc.blocks),
              "scores": nan_to_none(loc.scores.tolist()), "ranking": list(loc.ranking), "auto_k": auto_k(loc),
              "auto_k_rule": f"score_mass_k(scores, {AUTO_K_FRACTION})"}
    if loc.search is not None:  # the set-level search: its sets, curve and cost; scores are single-block drops
        s = loc.search
        record.update({"auto_k": s.k_for_drop(AUTO_K_DROP), "auto_k_rule": f"SetSearch.k_for_drop({AUTO_K_DROP})",
                       "objective": s.objective, "sets": [list(x) for x in s.sets], "baseline": s.baseline,
                       "presence": list(s.presence), "curve": s.curve, "cost": s.cost,
                       "search_prompts": loc.settings["prompts"], "search_seeds": loc.settings["seeds"],
                       "search_steps": loc.settings["num_inference_steps"]})
    return record


def _presences(scores: Mapping[frozenset, list[float]]) -> dict[frozenset, float]:
    return {s: float(np.mean(v)) for s, v in scores.items() if v}


def _scores_of(record: dict, blocks: Sequence[str], what: str) -> list[float]:
    """A localization record's scores of `blocks`, in that order (NaN: not measured)."""
    missing = [b for b in blocks if b not in record["blocks"]]
    if missing:
        raise DitlocError(f"the localization of {what} has no block {missing[0]!r} (it has "
                          f"{', '.join(record['blocks'])}); it was measured on another model")
    return [float(none_to_nan(record["scores"][record["blocks"].index(b)])) for b in blocks]
