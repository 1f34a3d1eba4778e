"""What a report shows, computed from a `ditloc bench` run directory.

- **Selection frequency** [categories, blocks]: the fraction of a category's
  concepts whose top-K blocks (from their localizations) include each block.
- **Presence curves**: per category, control (top, random, bottom) and K, the
  mean presence over every image (concept x prompt x seed), with a 95%
  confidence interval by the normal approximation, mean ± 1.96·s/√n (s the
  sample standard deviation). K = 0 is the baseline, shared by all controls.
- **Minimal K** per concept: the smallest K whose top-K withholding brings the
  mean presence below `threshold` x the baseline's mean presence; None ("none")
  if no K does, or if the baseline's mean is not positive (no ratio).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bench import BASELINE, CONTROLS, SETTINGS_FILE, BenchRow, read_rows, slugify
from ..errors import DitlocError

Z95 = 1.959964  # two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class CurvePoint:
    category: str
    control: str  # "baseline" (k = 0) or one of CONTROLS
    k: int
    mean: float
    low: float  # 95% CI, normal approximation (equal to mean when n = 1)
    high: float
    n: int  # images

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MinimalK:
    category: str
    concept: str
    baseline: float  # mean presence without intervention
    relative: dict  # K -> mean top-K presence / baseline (None without a positive baseline)
    minimal_k: int | None

    def to_dict(self) -> dict:
        return {**self.__dict__, "relative": {str(k): v for k, v in self.relative.items()}}


@dataclass(frozen=True)
class RunData:
    """A bench run as read from disk: its settings record, rows and the concepts' rankings."""

    path: Path
    record: dict  # bench.json
    rows: tuple[BenchRow, ...]
    blocks: tuple[str, ...]
    rankings: dict  # (category, concept) -> block names, best first

    @property
    def settings(self) -> dict:
        return self.record["settings"]

    @property
    def categories(self) -> list[str]:
        return list(self.record["concepts"])

    @property
    def ks(self) -> list[int]:
        return list(self.settings["ks"])

    @property
    def n_generation_units(self) -> int:
        n_concepts = sum(len(v) for v in self.record["concepts"].values())
        return n_concepts * (1 + len(CONTROLS) * len(self.ks))

    @property
    def complete(self) -> bool:
        return (self.path / "results.jsonl").exists()


def load_run(run) -> RunData:
    """Read a bench run directory (finished, or partial while it runs)."""
    run = Path(run)
    path = run / SETTINGS_FILE
    if not path.is_file():
        raise DitlocError(f"{run} is not a `ditloc bench` run directory (no {SETTINGS_FILE})")
    record = json.loads(path.read_text())
    rows = tuple(read_rows(run))
    if not rows:
        raise DitlocError(f"{run} has no results yet; run `ditloc bench` into it first")
    rankings, blocks = {}, ()
    for category, concepts in record["concepts"].items():
        for concept in concepts:
            loc_path = run / "localizations" / slugify(category) / f"{slugify(concept)}.json"
            if loc_path.is_file():
                d = json.loads(loc_path.read_text())
                rankings[category, concept] = tuple(d["ranking"])
                blocks = tuple(d["blocks"])
    return RunData(run, record, rows, blocks, rankings)


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def presence_curves(data: RunData) -> list[CurvePoint]:
    """Baseline (K = 0) and every (control, K) with rows, per category."""
    groups: dict[tuple, list[float]] = {}
    for r in data.rows:
        groups.setdefault((r.category, r.control, r.k), []).append(r.score)
    points = []
    for category in data.categories:
        for control, k in [(BASELINE, 0)] + [(c, k) for c in CONTROLS for k in data.ks]:
            values = groups.get((category, control, k))
            if values:
                points.append(CurvePoint(category, control, k, *_mean_ci(values), n=len(values)))
    return points


def selection_frequency(data: RunData, k: int) -> dict[str, list[float]]:
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


def minimal_k(data: RunData, threshold: float = 0.5) -> list[MinimalK]:
    """Per concept, the smallest K whose top-K mean presence < threshold x baseline mean."""
    groups: dict[tuple, list[float]] = {}
    for r in data.rows:
        if r.control in (BASELINE, "top"):
            groups.setdefault((r.category, r.concept, r.k), []).append(r.score)
    out = []
    for category, concepts in data.record["concepts"].items():
        for concept in concepts:
            base = groups.get((category, concept, 0))
            if not base:
                continue
            b = float(np.mean(base))
            relative, found = {}, None
            for k in data.ks:
                values = groups.get((category, concept, k))
                if not values:
                    continue
                relative[k] = float(np.mean(values)) / b if b > 0 else None
                if found is None and relative[k] is not None and relative[k] < threshold:
                    found = k
            out.append(MinimalK(category, concept, b, relative, found))
    return out
