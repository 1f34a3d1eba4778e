"""What a report shows, computed from a bench run (`ditloc.bench.read_run`).

- **Selection frequency** [categories, blocks]: the fraction of a category's
  concepts whose top-K blocks (from their localizations) include each block.
- **Presence curves**: per category, control (top, random, bottom), localization
  method (top and bottom) and K, the mean presence over every image (concept x
  prompt x seed), with a 95% confidence interval by the normal approximation,
  mean ± 1.96·s/√n (s the sample standard deviation). K = 0 is the baseline,
  shared by all controls.
- **K for a drop** per concept and method: the smallest K whose top-K withholding
  lowers the mean presence by at least `drop` x the baseline's mean presence (the
  rule of ``--k auto`` at the default drop of one half, `ditloc.localization.AUTO_K_DROP`);
  None ("none") if no K does, or if the baseline's mean is not positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bench import BASELINE, CONTROLS, DEFAULT_METHOD, BenchRun
from ..errors import DitlocError
from ..localization import AUTO_K_DROP
from ..stats import Z95, mean_ci  # noqa: F401  (Z95: part of this module's documented interval)


@dataclass(frozen=True)
class CurvePoint:
    category: str
    control: str  # "baseline" (k = 0) or one of CONTROLS
    k: int
    mean: float
    low: float  # 95% CI, normal approximation (equal to mean when n = 1)
    high: float
    n: int  # images
    method: str = ""  # top/bottom: the localization method that chose the blocks

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ConceptK:
    """One concept's K for a drop (`k_for_drop`) under one localization method."""

    category: str
    concept: str
    baseline: float  # mean presence without intervention
    relative: dict  # K -> mean top-K presence / baseline (None without a positive baseline)
    k: int | None  # the smallest K whose relative presence is at most 1 - drop; None: no K tested
    method: str = DEFAULT_METHOD

    def to_dict(self) -> dict:
        return {**self.__dict__, "relative": {str(k): v for k, v in self.relative.items()}}


def presence_curves(data: BenchRun) -> list[CurvePoint]:
    """Baseline (K = 0) and every (control, K) with rows, per category."""
    groups: dict[tuple, list[float]] = {}
    for r in data.rows:
        groups.setdefault((r.category, r.control, r.ranked_by, r.k), []).append(r.score)
    conditions = [(BASELINE, "", 0)]
    for control in CONTROLS:
        for method in ([""] if control == "random" else data.methods):
            conditions += [(control, method, k) for k in data.ks]
    points = []
    for category in data.categories:
        for control, method, k in conditions:
            values = groups.get((category, control, method, k))
            if values:
                points.append(CurvePoint(category, control, k, *mean_ci(values), n=len(values), method=method))
    return points


def selection_frequency(data: BenchRun, k: int) -> dict[str, list[float]]:
    """category -> [blocks]: the fraction of its localized concepts whose top-k includes each block."""
    if not data.blocks:
        raise DitlocError(f"{data.path} has no localizations yet")
    if not 1 <= k <= len(data.blocks):
        raise DitlocError(f"--k must be between 1 and {len(data.blocks)} (the number of blocks), got {k}")
    out = {}
    for category in data.categories:
        rankings = [r for (c, _), r in data.rankings.items() if c == category]
        counts = np.zeros(len(data.blocks))
        for ranking in rankings:
            for b in ranking[:k]:
                counts[data.blocks.index(b)] += 1
        out[category] = (counts / max(len(rankings), 1)).tolist()
    return out


def k_for_drop(data: BenchRun, drop: float = AUTO_K_DROP) -> list[ConceptK]:
    """Per concept and method, the smallest K whose top-K withholding lowers the mean presence by
    at least `drop` x the baseline mean (top-K presence <= (1 - drop) x baseline)."""
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 < drop <= 1:
        raise DitlocError(f"--drop must be a fraction of the baseline in (0, 1], got {drop!r}")
    groups: dict[tuple, list[float]] = {}
    for r in data.rows:
        if r.control in (BASELINE, "top"):
            groups.setdefault((r.category, r.concept, r.ranked_by, r.k), []).append(r.score)
    out = []
    for category, concepts in data.record["concepts"].items():
        for concept in concepts:
            base = groups.get((category, concept, "", 0))
            if not base:
                continue
            b = float(np.mean(base))
            for method in data.methods:
                relative, found = {}, None
                for k in data.ks:
                    values = groups.get((category, concept, method, k))
                    if not values:
                        continue
                    relative[k] = float(np.mean(values)) / b if b > 0 else None
                    if found is None and relative[k] is not None and 1 - relative[k] >= drop - 1e-12:
                        found = k
                out.append(ConceptK(category, concept, b, relative, found, method))
    return out
