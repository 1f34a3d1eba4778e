"""The metrics: pure functions of presences and scores (the module doc of `ditloc.bench.ground_truth`)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import DitlocError
from ...stats import mean_ci, wilson
from .settings import AUTO_K_FRACTION, HALF, MAX_K, REGRET_KS, STRONG_DROP, TIE

# --------------------------------------------------------------------------
# The metrics: pure functions of presences and scores
# --------------------------------------------------------------------------


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    x, y = _average_ranks(a), _average_ranks(b)
    if len(x) != len(y):
        raise DitlocError(f"spearman needs two sequences of one length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else None


def _average_ranks(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # the mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def ranking(blocks: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Blocks by score, highest first; ties keep the given order, blocks not measured (NaN
    or None) come last (as `Localization.ranking`)."""
    from ...localization import ranking_of

    return ranking_of(list(blocks), scores)


def auto_k(loc, fraction: float = AUTO_K_FRACTION) -> int:
    """A block-score localization's automatic K (`ditloc.localization.score_mass_k` of its scores)."""
    from ...localization import score_mass_k

    return score_mass_k(loc.scores, fraction)


def greedy_sets(presence: Mapping[frozenset, float], blocks: Sequence[str], max_k: int = MAX_K) -> list[frozenset]:
    """The greedy search's sets S1..Sk (k <= max_k): S1 the best single block, S(k+1)
    Sk plus the block that lowers presence most (ties: the earlier block). Stops early
    where a needed condition is not in `presence` (the runner computes it and asks again)."""
    path: list[frozenset] = []
    current: frozenset = frozenset()
    for _ in range(min(max_k, len(blocks))):
        candidates = [current | {b} for b in blocks if b not in current]
        if any(s not in presence for s in candidates):
            break
        current = min(candidates, key=lambda s: presence[s])  # min keeps the first of equal values
        path.append(current)
    return path


def _in_order(s, blocks: Sequence[str]) -> list[str]:
    return [b for b in blocks if b in s]


@dataclass(frozen=True)
class OracleResult:
    """What the search found for one concept. Drops are baseline - presence."""

    baseline: float
    blocks: tuple[str, ...]  # the blocks searched, model order
    single_drops: tuple[float, ...]  # [blocks]
    best_singles: tuple[str, ...]  # every block whose drop is the best within TIE
    best_single_drop: float
    best_pair: tuple[str, ...] | None
    best_pair_drop: float | None
    greedy: tuple[tuple[str, ...], ...]  # S1..S(max K), each in model order
    greedy_drops: tuple[float, ...]
    minimal_k: int | None  # None: no K <= max K halves presence (">4")
    #: K >= 3: the best drop of any measured K-block set (the greedy set, a method's top-K, a search's S_K)
    best_measured: tuple[float, ...] = ()  # [K - 3]

    def best_drop(self, k: int) -> float | None:
        """The best achievable drop at K: exhaustive for K <= 2; above, the best measured
        K-block set (greedy, methods' and searches' sets): a lower bound of the true best."""
        if k == 1:
            return self.best_single_drop
        if k == 2:
            return self.best_pair_drop
        if k - 3 < len(self.best_measured):
            return self.best_measured[k - 3]
        return self.greedy_drops[k - 1] if k <= len(self.greedy_drops) else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()} | {
            "greedy": [list(s) for s in self.greedy]}


def _missing(presence: Mapping[frozenset, float], conditions) -> list[frozenset]:
    return [s for s in conditions if s not in presence]


def oracle_result(presence: Mapping[frozenset, float], blocks: Sequence[str], *, max_k: int = MAX_K,
                  threshold: float = HALF) -> OracleResult:
    """The search's result from `presence` (condition -> mean presence; the empty set is
    the baseline), which must hold the baseline, every single, every pair and the greedy sets."""
    blocks = tuple(blocks)
    singles = [frozenset({b}) for b in blocks]
    pairs = [frozenset(p) for p in itertools.combinations(blocks, 2)]
    missing = _missing(presence, [frozenset()] + singles + pairs)
    path = greedy_sets(presence, blocks, max_k)
    if not missing and len(path) < min(max_k, len(blocks)):  # a greedy step's conditions are absent
        last = path[-1] if path else frozenset()
        missing = _missing(presence, [last | {b} for b in blocks if b not in last])
    if missing:
        raise DitlocError(f"the search is incomplete: no presence for {', '.join(_in_order(missing[0], blocks)) or 'the baseline'}")
    base = float(presence[frozenset()])
    drops = [base - float(presence[s]) for s in singles]
    best = max(drops)
    best_pair, best_pair_drop = None, None
    if pairs:
        pair_drops = [base - float(presence[s]) for s in pairs]
        i = int(np.argmax(pair_drops))  # the first of equal drops
        best_pair, best_pair_drop = tuple(_in_order(pairs[i], blocks)), pair_drops[i]
    greedy_drops = tuple(base - float(presence[s]) for s in path)
    searched = set(blocks)
    best_measured = tuple(max(base - float(p) for s, p in presence.items() if len(s) == k and s <= searched)
                          for k in range(3, len(path) + 1))
    best_presence = [base - best] + ([base - best_pair_drop] if pairs else []) + [base - d for d in best_measured]
    minimal = None
    if base > 0:
        minimal = next((k for k, p in enumerate(best_presence, 1) if p < threshold * base), None)
    return OracleResult(
        baseline=base, blocks=blocks, single_drops=tuple(drops),
        best_singles=tuple(b for b, d in zip(blocks, drops) if d >= best - TIE), best_single_drop=best,
        best_pair=best_pair, best_pair_drop=best_pair_drop, greedy=tuple(tuple(_in_order(s, blocks)) for s in path),
        greedy_drops=greedy_drops, minimal_k=minimal, best_measured=best_measured,
    )


def method_conditions(blocks: Sequence[str], scores: Sequence[float], max_k: int = MAX_K) -> list[frozenset]:
    """The method's top-K sets, K = 1..max K (those it needs measured)."""
    order = ranking(blocks, scores)
    return [frozenset(order[:k]) for k in range(1, min(max_k, len(blocks)) + 1)]


@dataclass(frozen=True)
class MethodMetrics:
    """One method on one concept, against the search (see the module doc)."""

    method: str
    top: tuple[str, ...]  # its top blocks (up to max K) among those searched, best first
    top_drops: tuple[float, ...]  # drop of its top-1 .. top-(max K) sets
    hit_at_1: bool
    regret: dict  # K -> best drop at K - its top-K drop (K = 1, 2, 4; None where K > blocks)
    spearman: float | None  # its scores against the single-block drops
    pair_rank: int | None  # its top-2 pair among all pairs by drop (1 = best; ties share the best rank)
    n_pairs: int
    auto_k: int | None
    oracle_k: int | None  # None: > max K
    k_match: bool | None  # None where the oracle's K is > max K (no exact value to match)
    k_diff: int | None  # auto K - oracle K

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["top"], d["top_drops"] = list(self.top), list(self.top_drops)
        d["regret"] = {str(k): v for k, v in self.regret.items()}
        return d


def method_metrics(method: str, presence: Mapping[frozenset, float], blocks: Sequence[str], scores: Sequence[float],
                   *, auto_k: int | None, oracle: OracleResult | None = None, max_k: int = MAX_K,
                   threshold: float = HALF, sets: Sequence[Sequence[str]] | None = None) -> MethodMetrics:
    """Judge a method's block scores (aligned with `blocks`, the blocks searched) against
    the search's presences. `oracle`: `oracle_result(presence, blocks)` if already computed.
    `sets`: a set-level method's own K-sets (K = 1..), judged instead of its scores' top-K."""
    blocks = tuple(blocks)
    if len(scores) != len(blocks):
        raise DitlocError(f"{method}: {len(scores)} scores for {len(blocks)} blocks")
    oracle = oracle if oracle is not None else oracle_result(presence, blocks, max_k=max_k, threshold=threshold)
    tops = method_conditions(blocks, scores, max_k) if sets is None else [frozenset(s) for s in sets][:max_k]
    missing = _missing(presence, tops)
    if missing:
        raise DitlocError(f"{method}: no presence for its top-{len(missing[0])} set {', '.join(_in_order(missing[0], blocks))}")
    base = oracle.baseline
    top_drops = tuple(base - float(presence[s]) for s in tops)
    regret = {}
    for k in REGRET_KS:
        best = oracle.best_drop(k)
        regret[k] = best - top_drops[k - 1] if best is not None and k <= len(top_drops) else None
    pair_rank, n_pairs = None, len(blocks) * (len(blocks) - 1) // 2
    if len(tops) >= 2:
        pair_drops = [base - float(presence[frozenset(p)]) for p in itertools.combinations(blocks, 2)]
        pair_rank = 1 + sum(d > top_drops[1] + TIE for d in pair_drops)
    order = ranking(blocks, scores) if sets is None else list(sets[len(tops) - 1])
    oracle_k = oracle.minimal_k
    return MethodMetrics(
        method=method, top=tuple(order[: len(tops)]), top_drops=top_drops,
        hit_at_1=top_drops[0] >= oracle.best_single_drop - TIE, regret=regret,
        spearman=spearman(scores, oracle.single_drops), pair_rank=pair_rank, n_pairs=n_pairs,
        auto_k=auto_k, oracle_k=oracle_k,
        # a search whose curve reaches no K (None) where the oracle has one is a miss, not a skip
        k_match=None if oracle_k is None or (auto_k is None and sets is None) else auto_k == oracle_k,
        k_diff=None if oracle_k is None or auto_k is None else auto_k - oracle_k,
    )


def _mean(values) -> dict:
    """Mean over concepts with its 95% CI (normal approximation; the mean itself when n < 2)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, low, high = mean_ci(values)
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def _rate(hits) -> dict:
    """A proportion over concepts with its 95% Wilson score interval."""
    hits = [bool(h) for h in hits]
    n = len(hits)
    if not n:
        return {"rate": None, "low": None, "high": None, "n": 0}
    low, high = wilson(sum(hits), n)
    return {"rate": sum(hits) / n, "low": low, "high": high, "n": n}


def summarize_methods(rows: Sequence[tuple[OracleResult, MethodMetrics]]) -> dict:
    """Per method over concepts: hit@1 rate (concepts whose best single block drops
    presence >= STRONG_DROP), mean regret@1/2/4, mean Spearman, the automatic K's
    exact-match rate and mean |auto K - oracle K| (concepts whose oracle K is <= 4)."""
    by_method: dict[str, list] = {}
    for oracle, m in rows:
        by_method.setdefault(m.method, []).append((oracle, m))
    out = {}
    for method, pairs in by_method.items():
        strong = [m.hit_at_1 for o, m in pairs if o.best_single_drop >= STRONG_DROP]
        known = [m for _, m in pairs if m.k_match is not None]
        out[method] = {
            "concepts": len(pairs),
            "hit_at_1": _rate(strong),
            **{f"regret_{k}": _mean(m.regret.get(k) for _, m in pairs) for k in REGRET_KS},
            "spearman": _mean(m.spearman for _, m in pairs),
            "auto_k_match": _rate(m.k_match for m in known),
            "auto_k_miss": {**{k: v for k, v in _mean(abs(m.k_diff) for m in known if m.k_diff is not None).items()
                               if k != "mean"},
                            "mean_abs": _mean(abs(m.k_diff) for m in known if m.k_diff is not None)["mean"]},
        }
    return out


def paired_regrets(concepts: Sequence[Mapping], reference: str) -> dict:
    """Every other method's regret@K minus `reference`'s, paired over the concepts both
    were measured on (per-concept entries of the summary: {"methods": {method: metrics
    dict or None}}): the mean difference with its 95% CI over concepts, and on how many
    concepts the method's regret is above the reference's (`worse`) or below it
    (`better`), ties within TIE. Pairing removes what the concepts share (how hard each
    is), so it can find a difference the per-method intervals both cover."""
    methods = list(dict.fromkeys(m for c in concepts for m in c["methods"] if m != reference))
    out = {}
    for method in methods:
        both = [(c["methods"][method], c["methods"][reference]) for c in concepts
                if c["methods"].get(method) is not None and c["methods"].get(reference) is not None]
        row = {}
        for k in REGRET_KS:
            diffs = [m["regret"][str(k)] - r["regret"][str(k)] for m, r in both
                     if m["regret"].get(str(k)) is not None and r["regret"].get(str(k)) is not None]
            row[f"regret_{k}"] = {**_mean(diffs), "worse": sum(d > TIE for d in diffs),
                                  "better": sum(d < -TIE for d in diffs)}
        out[method] = row
    return out
