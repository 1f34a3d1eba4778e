"""Ground truth for localization on the toy world (method.md §7), and every method judged against it.

Per toy concept, withhold the concept from every single block, every pair of
blocks and greedily up to K = 4 blocks, generate held-out images and read the
concept's presence with the toy oracle. Then localize the concept with each
method and score its ranking against that search:

    drop(S)      baseline presence - presence with S withheld
    hit@1        the method's top block is the best single block (a tie within 1e-9 counts)
    regret@K     best achievable drop at K - drop of the method's top-K, K = 1, 2, 4
                 (best single, best pair, and at 4 the *greedy* set: the search is exhaustive to K = 2 only)
    spearman     rank correlation of the method's block scores with the single-block drops
    pair rank    where the method's top-2 pair falls among all pairs by drop (1 = best)
    minimal K    oracle: the smallest K in 1..4 whose best set (best single, best pair, greedy 3,
                 greedy 4) brings presence below half the baseline, else None (">4");
                 the method's own automatic K (`Localization.minimal_k(0.5)`), compared with it

A *condition* is the set of blocks withheld (the empty set: the baseline). Each
(concept, condition) is generated once and appended, with every image's score,
to ``conditions.jsonl``; a rerun of the same command reads it and computes only
what is missing. The run directory:

    ground_truth.json                            settings, model record, concepts (prompts, samples), methods
    conditions.jsonl                             one line per (concept, condition): blocks, per-image scores
    localizations.jsonl                          one line per (concept, method): block scores, automatic K
    localizations/<category>/<slug>.<method>.json  the full Localization (per step, sample and head; large)
    summary.json, summary.md                     `summarize_ground_truth(out)`: recomputed from the two
                                                 JSONL stores and ground_truth.json (not localizations/)

    from ditloc.bench import GroundTruthSettings, run_ground_truth, summarize_ground_truth
    result = run_ground_truth(ditloc.toy.load_pipeline(), "runs/gt", GroundTruthSettings(categories=("hazard",)))
    summary = summarize_ground_truth("runs/gt")     # no model needed
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import OutputLock, write_atomic, write_json
from .._version import __version__
from ..errors import DitlocError
from ..localize import minimal_k_of
from ..stats import mean_ci, wilson
from .plan import BenchSettings, ConceptPlan, plan_bench, slugify
from .runner import generate_scored
from .store import ResultStore

FORMAT = "ditloc.ground_truth/1"
SETTINGS_FILE = "ground_truth.json"
STORE_FILE = "conditions.jsonl"
LOCALIZATIONS_FILE = "localizations.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
#: the localization methods a ground truth can judge (method.md §1 and §7)
METHODS = ("contribution", "patch", "attribution")
MAX_K = 4  # the greedy search's largest set
REGRET_KS = (1, 2, 4)
HALF = 0.5  # the oracle's minimal K: presence below HALF x baseline
AUTO_K_FRACTION = 0.5  # a method's automatic K: `minimal_k(AUTO_K_FRACTION)`
STRONG_DROP = 0.3  # hit@1 is summarized over concepts whose best single block drops presence this much
TIE = 1e-9  # drops this close count as equal


# --------------------------------------------------------------------------
# Settings and plan
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruthSettings:
    """What to measure. `categories` / `concepts` / `methods` select the work (a rerun
    into the same directory may select more); the other fields decide the numbers and
    must not change in a run directory (see `record`).

    `n_images` held-out images per condition: the toy probe set's evaluation prompts
    (15 per concept) x seeds 0, 1, ... until there are `n_images` (see `samples`).
    `blocks` restricts the search to those blocks (None: every block of the model);
    meant for quick checks, since the search costs 1 + n + n(n-1)/2 + ... conditions.
    """

    model: str = "toy"
    categories: tuple[str, ...] = ()
    concepts: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHODS
    steps: int = 20
    n_images: int = 32
    guidance_scale: float | None = None
    max_sequence_length: int | None = 32
    localize_seed: int = 0
    batch_size: int = 64
    localize_batch_size: int = 8
    blocks: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("categories", "concepts", "methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
            if len(self.blocks) < 2 or len(set(self.blocks)) != len(self.blocks):
                raise DitlocError(f"blocks must be at least 2 distinct block names, got {list(self.blocks)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise DitlocError(f"unknown method {unknown[0]!r}; use one or more of {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise DitlocError(f"methods must be distinct names among {', '.join(METHODS)}, got {list(self.methods)}")
        for name in ("steps", "n_images", "batch_size", "localize_batch_size"):
            if int(getattr(self, name)) < 1:
                raise DitlocError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def record(self) -> dict:
        """The settings that decide the numbers (ground_truth.json's "settings")."""
        return {
            "model": self.model, "probes": "toy", "evaluator": "toy", "steps": int(self.steps),
            "n_images": int(self.n_images), "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length, "localize_seed": int(self.localize_seed),
            "batch_size": int(self.batch_size), "localize_batch_size": int(self.localize_batch_size),
            "blocks": list(self.blocks) if self.blocks is not None else None, "max_k": MAX_K,
        }

    @property
    def bench_settings(self) -> BenchSettings:
        """The same generation settings as a bench's (its plan and RunOptions)."""
        return BenchSettings(model=self.model, probes="toy", ks=(1,), seeds=(0,), evaluator="toy",
                             categories=self.categories, steps=self.steps, guidance_scale=self.guidance_scale,
                             max_sequence_length=self.max_sequence_length, localize_seed=self.localize_seed,
                             batch_size=self.batch_size)

    @property
    def run_options(self):
        return self.bench_settings.run_options


def samples(n_prompts: int, n_images: int) -> list[tuple[int, int]]:
    """The (prompt index, seed) of each image of a condition, in generation order: every
    prompt x seeds 0..F-1 (prompt-major), then the first R prompts x seed F, where
    n_images = F * n_prompts + R. Fewer images than prompts: the first n_images prompts, seed 0."""
    full, rest = divmod(n_images, n_prompts)
    return [(p, s) for p in range(n_prompts) for s in range(full)] + [(p, full) for p in range(rest)]


def plan_ground_truth(settings: GroundTruthSettings, probes=None) -> tuple[ConceptPlan, ...]:
    """The toy concepts `settings` selects, with their prompts; every name is checked
    here (and the methods' availability), before any model runs."""
    from ..probes import load_probe_set

    probes = probes if probes is not None else load_probe_set("toy")
    for category in settings.categories:
        if category not in probes.category_names:
            raise DitlocError(f"unknown category {category!r}; the toy categories are "
                              f"{', '.join(probes.category_names)}")
    concepts = plan_bench(settings.bench_settings, probes).concepts
    if settings.concepts:
        names = {c.concept: c for c in concepts}
        for name in settings.concepts:
            if name not in names:
                where = f"of the categories {', '.join(settings.categories)}" if settings.categories else "in the toy world"
                raise DitlocError(f"no concept {name!r} {where}; choose among {', '.join(names)}")
        concepts = tuple(c for c in concepts if c.concept in set(settings.concepts))
    return tuple(concepts)


def localization_file(category: str, slug: str, method: str) -> str:
    """Where a concept's localization by `method` lies, relative to the run directory."""
    return f"localizations/{slugify(category)}/{slug}.{method}.json"


def _concept_record(c: ConceptPlan, n_images: int) -> dict:
    return {"category": c.category, "concept": c.concept, "slug": c.slug, "eval_text": c.eval_text,
            "localization_prompts": list(c.localization_prompts), "evaluation_prompts": list(c.evaluation_prompts),
            "clean_prompts": list(c.clean_prompts),
            "samples": [list(s) for s in samples(len(c.evaluation_prompts), n_images)]}


def _read_record(out: Path) -> dict | None:
    path = out / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DitlocError(f"cannot read {path}: {e}; restore it or use a new --out directory") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("settings"), dict):
        raise DitlocError(f"{path} is not a {FORMAT} settings file; use a new --out directory")
    return record


def check_ground_truth_dir(out, settings: GroundTruthSettings) -> bool:
    """Refuse a directory that holds a ground truth measured with other settings (a
    different selection of concepts or methods is fine: it adds to the directory).
    True when it holds one with these settings (a rerun resumes it)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise DitlocError(f"{out} is a file; pass a directory (it is created if missing)")
    record = _read_record(Path(out))
    if record is None:
        return False
    old, new = record["settings"], settings.record()
    diffs = [f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in new.items() if old.get(k) != v]
    if diffs:
        raise DitlocError(f"{out} holds a ground truth with other settings ({'; '.join(diffs[:3])}); rerun with the "
                          "same settings to resume, or use a new --out directory")
    return True


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
    """Blocks by score, highest first; ties keep the given order (as `Localization.ranking`)."""
    order = sorted(range(len(blocks)), key=lambda i: -float(scores[i]))  # sorted is stable
    return [blocks[i] for i in order]


def auto_k(loc, fraction: float = AUTO_K_FRACTION) -> int:
    """A localization's automatic K (`Localization.minimal_k`)."""
    return int(loc.minimal_k(fraction))


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

    def best_drop(self, k: int) -> float | None:
        """The best achievable drop at K: exhaustive for K <= 2, greedy above."""
        if k == 1:
            return self.best_single_drop
        if k == 2:
            return self.best_pair_drop
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
    best_presence = [base - best] + ([base - best_pair_drop] if pairs else []) + [base - d for d in greedy_drops[2:]]
    minimal = None
    if base > 0:
        minimal = next((k for k, p in enumerate(best_presence, 1) if p < threshold * base), None)
    return OracleResult(
        baseline=base, blocks=blocks, single_drops=tuple(drops),
        best_singles=tuple(b for b, d in zip(blocks, drops) if d >= best - TIE), best_single_drop=best,
        best_pair=best_pair, best_pair_drop=best_pair_drop, greedy=tuple(tuple(_in_order(s, blocks)) for s in path),
        greedy_drops=greedy_drops, minimal_k=minimal,
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
                   threshold: float = HALF) -> MethodMetrics:
    """Judge a method's block scores (aligned with `blocks`, the blocks searched) against
    the search's presences. `oracle`: `oracle_result(presence, blocks)` if already computed."""
    blocks = tuple(blocks)
    if len(scores) != len(blocks):
        raise DitlocError(f"{method}: {len(scores)} scores for {len(blocks)} blocks")
    oracle = oracle if oracle is not None else oracle_result(presence, blocks, max_k=max_k, threshold=threshold)
    tops = method_conditions(blocks, scores, max_k)
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
    order = ranking(blocks, scores)
    oracle_k = oracle.minimal_k
    return MethodMetrics(
        method=method, top=tuple(order[: len(tops)]), top_drops=top_drops,
        hit_at_1=top_drops[0] >= oracle.best_single_drop - TIE, regret=regret,
        spearman=spearman(scores, oracle.single_drops), pair_rank=pair_rank, n_pairs=n_pairs,
        auto_k=auto_k, oracle_k=oracle_k,
        k_match=None if oracle_k is None or auto_k is None else auto_k == oracle_k,
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
            "auto_k_miss": {**{k: v for k, v in _mean(abs(m.k_diff) for m in known).items() if k != "mean"},
                            "mean_abs": _mean(abs(m.k_diff) for m in known)["mean"]},
        }
    return out


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


def read_conditions(out) -> dict[tuple[str, str], dict[frozenset, list[float]]]:
    """Every measured condition in the run directory: (category, concept) -> condition -> per-image scores."""
    path = Path(out) / STORE_FILE
    found: dict[tuple[str, str], dict[frozenset, list[float]]] = {}
    for n, record in enumerate(ResultStore.read(path), 1):
        try:
            key, blocks, scores = (record["category"], record["concept"]), record["blocks"], record["scores"]
            found.setdefault(key, {}).setdefault(frozenset(blocks), [float(s) for s in scores])
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
            if len(record["blocks"]) != len(record["scores"]) or not isinstance(record["auto_k"], int):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DitlocError(f"{path}:{n}: not a localization record; move the store away and rerun the same "
                              "command to rewrite it") from None
        found.setdefault(key, record)
    return found


def _localization_record(c: ConceptPlan, method: str, loc) -> dict:
    return {"category": c.category, "concept": c.concept, "method": method,
            "file": localization_file(c.category, c.slug, method), "blocks": list(loc.blocks),
            "scores": [float(x) for x in loc.scores.tolist()], "ranking": list(loc.ranking), "auto_k": auto_k(loc),
            "auto_k_rule": f"Localization.minimal_k({AUTO_K_FRACTION})"}


def _presences(scores: Mapping[frozenset, list[float]]) -> dict[frozenset, float]:
    return {s: float(np.mean(v)) for s, v in scores.items() if v}


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruthResult:
    conditions_run: int  # generated this time
    conditions_reused: int  # found in the store
    localizations_run: int
    seconds: float
    summary: dict  # summary.json's content


def _fmt_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def expected_conditions(n_blocks: int, n_methods: int, max_k: int = MAX_K) -> int:
    """An upper bound on one concept's conditions: baseline, singles, pairs, the greedy
    steps above 2, and each method's top-3 .. top-(max K) sets."""
    greedy = sum(n_blocks - k + 1 for k in range(3, min(max_k, n_blocks) + 1))
    return 1 + n_blocks + n_blocks * (n_blocks - 1) // 2 + greedy + n_methods * max(0, min(max_k, n_blocks) - 2)


class _Run:
    """One call's state: the pipeline, the store, the cache and the progress line."""

    def __init__(self, pipe, out: Path, settings: GroundTruthSettings, evaluator, blocks: list[str], say, n_concepts):
        self.pipe, self.out, self.settings, self.evaluator, self.blocks, self.say = (
            pipe, out, settings, evaluator, blocks, say)
        self.store = ResultStore(out / STORE_FILE)
        self.cache = read_conditions(out)
        self.loc_store = ResultStore(out / LOCALIZATIONS_FILE)
        self.locs = read_localizations(out)
        self.t0 = time.time()
        self.ran = self.reused = self.localized = 0
        self.expected = n_concepts * expected_conditions(len(blocks), len(settings.methods))
        self.seen = 0  # conditions of this call's concepts so far, run or reused
        self.counted: set = set()

    def localization(self, c: ConceptPlan, method: str) -> dict:
        """The concept's localization record by `method`: from the store, else from its
        file (a run killed between the two), else localized now."""
        from ..localize import Localization, localize

        key = (c.category, c.concept, method)
        if key in self.locs:
            return self.locs[key]
        path = self.out / localization_file(c.category, c.slug, method)
        if path.exists():
            loc = Localization.load(path)
        else:
            s, t = self.settings, time.time()
            # the causal methods compare with the probe set's clean prompts (grammatical, as in generation)
            clean = list(c.localization_clean_prompts) if method != "contribution" else None
            loc = localize(self.pipe, list(c.localization_prompts), c.concept, method=method, clean_prompts=clean,
                           seed=s.localize_seed, batch_size=s.localize_batch_size, options=s.run_options)
            loc.save(path)
            self.localized += 1
            self.say(f"ground-truth {c.category}/{c.concept}: localized by {method} ({time.time() - t:.1f}s)")
        self.locs[key] = _localization_record(c, method, loc)
        self.loc_store.append(self.locs[key])
        return self.locs[key]

    def measure(self, c: ConceptPlan, conditions: list[frozenset], label: str) -> dict[frozenset, float]:
        """Generate and score every condition not in the cache; the concept's presences."""
        key = (c.category, c.concept)
        cached = self.cache.setdefault(key, {})
        todo = list(dict.fromkeys(s for s in conditions if s not in cached))
        fresh = {(key, s) for s in conditions} - self.counted  # each condition is counted once
        self.reused += sum(1 for _, s in fresh if s in cached)
        self.seen += len(fresh)
        self.counted |= fresh
        t_batch = time.time()
        for s in todo:
            scores = self._generate(c, s)
            self.store.append({"category": c.category, "concept": c.concept, "blocks": _in_order(s, self.blocks),
                               "presence": float(np.mean(scores)), "scores": scores})
            cached[s] = scores
            self.ran += 1
        if todo:
            elapsed = time.time() - self.t0
            rate = elapsed / max(self.ran, 1)
            remaining = max(self.expected - self.seen, 0) * rate
            self.say(f"ground-truth {c.category}/{c.concept}: {label}, {len(todo)} condition(s) in "
                     f"{time.time() - t_batch:.1f}s ({self.ran} run, {self.reused} reused; "
                     f"{_fmt_seconds(elapsed)} elapsed, ETA ~{_fmt_seconds(remaining)})")
        return _presences(cached)

    def _generate(self, c: ConceptPlan, condition: frozenset) -> list[float]:
        s = self.settings
        blocks = _in_order(condition, self.blocks) or None
        full, rest = divmod(s.n_images, len(c.evaluation_prompts))
        groups = []  # the calls that make `samples(...)`, in its order
        if full:
            groups.append((c, list(range(full))))
        if rest:
            groups.append((dataclasses.replace(c, evaluation_prompts=c.evaluation_prompts[:rest],
                                               clean_prompts=c.clean_prompts[:rest]), [full]))
        scores: list[float] = []
        for plan, seeds in groups:
            _, values = generate_scored(self.pipe, plan, blocks, self.evaluator, seeds=seeds,
                                        batch_size=s.batch_size, options=s.run_options)
            scores += [round(float(v), 6) for v in values]
        return scores

    def concept(self, c: ConceptPlan) -> None:
        blocks, methods = self.blocks, self.settings.methods
        locs = {m: self.localization(c, m) for m in methods}
        presence = self.measure(c, [frozenset()] + [frozenset({b}) for b in blocks], "baseline and single blocks")
        presence = self.measure(c, [frozenset(p) for p in itertools.combinations(blocks, 2)], "pairs")
        for k in range(3, min(MAX_K, len(blocks)) + 1):
            last = greedy_sets(presence, blocks, k - 1)[-1]
            presence = self.measure(c, [last | {b} for b in blocks if b not in last], f"greedy K={k}")
        for m, loc in locs.items():
            scores = _scores_of(loc, blocks, f"{c.category}/{c.concept} ({m})")
            self.measure(c, method_conditions(blocks, scores)[2:], f"{m}'s top sets")


def _scores_of(record: dict, blocks: Sequence[str], what: str) -> list[float]:
    """A localization record's scores of `blocks`, in that order."""
    missing = [b for b in blocks if b not in record["blocks"]]
    if missing:
        raise DitlocError(f"the localization of {what} has no block {missing[0]!r} (it has "
                          f"{', '.join(record['blocks'])}); it was measured on another model")
    return [float(record["scores"][record["blocks"].index(b)]) for b in blocks]


def _model_check(pipe) -> dict:
    from ..options import model_record

    return {k: v for k, v in model_record(pipe).items() if k in ("pipeline", "transformer", "dtype")}


def run_ground_truth(pipe, out, settings: GroundTruthSettings | None = None, *, evaluator=None,
                     progress: Callable[[str], None] | None = None) -> GroundTruthResult:
    """Run (or resume) the ground truth of `settings` (default: every toy concept, every
    method) on `pipe` (the toy model) into directory `out`, then write the summary.
    Other settings in `out` are refused before anything is touched; so is a second
    writer (OutputLock)."""
    from ..evaluate import get_evaluator
    from ..options import model_record

    settings = settings if settings is not None else GroundTruthSettings()
    out = Path(out)
    concepts = plan_ground_truth(settings)
    check_ground_truth_dir(out, settings)
    evaluator = evaluator if evaluator is not None else get_evaluator("toy")
    say = progress or (lambda message: None)
    resolved = settings.run_options.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    model_blocks = adapter.block_names()
    blocks = list(settings.blocks) if settings.blocks is not None else list(model_blocks)
    unknown = [b for b in blocks if b not in model_blocks]
    if unknown:
        raise DitlocError(f"unknown block {unknown[0]!r}; the model's blocks are {', '.join(model_blocks)}")
    blocks = [b for b in model_blocks if b in blocks]  # model order
    for c in concepts:
        for p in c.localization_prompts + c.evaluation_prompts:
            adapter.concept_span(p, c.concept, kw)
        evaluator.check_text(c.eval_text)
    with OutputLock(out):
        record = _read_record(out)
        check = _model_check(pipe)
        if record is not None:
            old = {k: record.get("model", {}).get(k) for k in check}
            if old != check or record.get("blocks") != blocks:
                raise DitlocError(f"{out} was measured on another model ({old} with blocks {record.get('blocks')}); "
                                  "use a new --out directory")
        record = _merged_record(record, settings, concepts, blocks, model_blocks, model_record(pipe), resolved)
        write_json(out / SETTINGS_FILE, record)
        run = _Run(pipe, out, settings, evaluator, blocks, say, len(concepts))
        say(f"ground-truth: {len(concepts)} concept(s), {len(blocks)} blocks, {settings.n_images} images per "
            f"condition, methods {', '.join(settings.methods)}"
            + (f"; {sum(len(v) for v in run.cache.values())} condition(s) already measured" if run.cache else ""))
        for c in concepts:
            run.concept(c)
            summary = summarize_ground_truth(out)  # after every concept: a partial run has a summary too
        return GroundTruthResult(run.ran, run.reused, run.localized, time.time() - run.t0, summary)


def _merged_record(record: dict | None, settings: GroundTruthSettings, concepts, blocks, model_blocks, model,
                   resolved) -> dict:
    """ground_truth.json: the settings, the model, and the union of every run's concepts and methods."""
    new = [_concept_record(c, settings.n_images) for c in concepts]
    if record is None:
        return {"format": FORMAT, "ditloc_version": __version__, "settings": settings.record(),
                "generation": resolved.record(), "model": model, "blocks": blocks, "model_blocks": list(model_blocks),
                "methods": list(settings.methods), "concepts": new}
    have = {(c["category"], c["concept"]): c for c in record["concepts"]}
    for c in new:
        old = have.get((c["category"], c["concept"]))
        if old is not None and old != c:
            raise DitlocError(f"the prompts of {c['category']}/{c['concept']} differ from those measured in this "
                              "directory (another toy probe set?); use a new --out directory")
    record["concepts"] += [c for c in new if (c["category"], c["concept"]) not in have]
    methods = set(record["methods"]) | set(settings.methods)
    record["methods"] = [m for m in METHODS if m in methods]
    return record


# --------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------


def summarize_ground_truth(out, *, threshold: float = HALF) -> dict:
    """Recompute summary.json and summary.md from a run directory's files (no model):
    per concept the search's result and every method's metrics, and per method the
    summary over concepts. Concepts or methods still incomplete are listed as such."""
    out = Path(out)
    record = _read_record(out)
    if record is None:
        raise DitlocError(f"{out} is not a ground-truth directory (no {SETTINGS_FILE}); run `ditloc ground-truth` first")
    try:
        blocks, methods, concepts = list(record["blocks"]), list(record["methods"]), list(record["concepts"])
    except (KeyError, TypeError):
        raise DitlocError(f"{out / SETTINGS_FILE} lacks blocks, methods or concepts; use a new --out directory") from None
    measured = read_conditions(out)
    localizations = read_localizations(out)
    rows, per_concept, incomplete = [], [], []
    for c in concepts:
        category, concept = c["category"], c["concept"]
        scores = measured.get((category, concept), {})
        presence = _presences(scores)
        try:
            oracle = oracle_result(presence, blocks, threshold=threshold)
        except DitlocError as e:
            incomplete.append({"category": category, "concept": concept, "missing": str(e)})
            continue
        _, low, high = mean_ci(scores[frozenset()])
        entry = {"category": category, "concept": concept, "n_images": len(scores[frozenset()]),
                 "baseline_ci": [low, high], "oracle": oracle.to_dict(), "methods": {}}
        for method in methods:
            loc = localizations.get((category, concept, method))
            if loc is None:
                entry["methods"][method] = None
                continue
            try:
                block_scores = _scores_of(loc, blocks, f"{category}/{concept}")
                # the automatic K by the current rule, from the stored scores (the rule can change without a rerun)
                m = method_metrics(method, presence, blocks, block_scores,
                                   auto_k=minimal_k_of(loc["scores"], AUTO_K_FRACTION), oracle=oracle,
                                   threshold=threshold)
            except DitlocError as e:
                incomplete.append({"category": category, "concept": concept, "method": method, "missing": str(e)})
                entry["methods"][method] = None
                continue
            entry["methods"][method] = m.to_dict()
            rows.append((oracle, m))
        per_concept.append(entry)
    summary = {
        "format": f"{FORMAT}/summary", "settings": record["settings"], "blocks": blocks, "methods": methods,
        "definitions": {
            "drop": "baseline presence - presence with the set withheld (presence: mean toy-oracle score)",
            "hit_at_1": f"top block's drop within {TIE:g} of the best single block's; the rate is over concepts "
                        f"whose best single block drops presence >= {STRONG_DROP}",
            "regret": "best achievable drop at K - drop of the method's top-K (K=1 best single, K=2 best pair, "
                      "K=4 the greedy set: not exhaustive, so regret@4 can be negative)",
            "spearman": "rank correlation (average ranks) of the method's block scores with the single-block drops",
            "pair_rank": "rank of the method's top-2 pair among all pairs by drop (1 = best)",
            "oracle_k": f"smallest K in 1..{MAX_K} whose best set brings presence below {threshold:g} x baseline; "
                        f"null: > {MAX_K}",
            "auto_k": f"the method's Localization.minimal_k({AUTO_K_FRACTION}); matches are counted where oracle_k "
                      "is known",
            "ci": "95% CI by the normal approximation, mean ± 1.96 s/sqrt(n) over images",
        },
        "concepts": per_concept,
        "incomplete": incomplete,
        "summary": summarize_methods(rows),
    }
    write_json(out / SUMMARY_JSON, summary, allow_nan=False)
    write_atomic(out / SUMMARY_MD, summary_markdown(summary))
    return summary


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |"

    return [line(header), line(["---"] * len(header))] + [line(r) for r in rows]


def summary_tables(summary: dict) -> tuple[str, list[tuple[str, str, list[str], list[list[str]]]]]:
    """(intro, [(heading, text, header, rows)]): the search per concept, every method per
    concept, and the per-method summary, as text cells (summary.md and the HTML report)."""
    s = summary["settings"]
    intro = (f"{s['n_images']} held-out images per condition, {s['steps']} steps, blocks searched: "
             f"{', '.join(summary['blocks'])}. Presence: mean toy-oracle score; drop = baseline - presence. "
             "Oracle K: smallest K whose best set (best single, best pair, greedy 3, greedy 4) brings presence "
             f"below half the baseline (– : > {MAX_K}).")
    search = []
    for e in summary["concepts"]:
        o = e["oracle"]
        low, high = e["baseline_ci"]
        search.append([e["category"], e["concept"], f"{_f(o['baseline'])} ({_f(low)}–{_f(high)})",
                       ", ".join(o["best_singles"]), _f(o["best_single_drop"]), ", ".join(o["best_pair"] or []),
                       _f(o["best_pair_drop"]), ", ".join(o["greedy"][-1]), _f(o["greedy_drops"][-1]),
                       _f(o["minimal_k"])])
    methods = []
    for e in summary["concepts"]:
        for method, m in e["methods"].items():
            head = [e["category"], e["concept"], method]
            if m is None:
                methods.append(head + ["(not measured)"])
                continue
            r = m["regret"]
            methods.append(head + [m["top"][0], _f(m["hit_at_1"]), _f(r.get("1")), _f(r.get("2")), _f(r.get("4")),
                                   _f(m["spearman"], 2), f"{_f(m['pair_rank'])}/{m['n_pairs']}", _f(m["auto_k"]),
                                   _f(m["oracle_k"])])
    def ci(v: dict, key: str, digits: int = 3) -> str:
        if v.get(key) is None:
            return f"– ({v['n']})"
        if v.get("low") is None:
            return f"{_f(v[key], digits)} ({v['n']})"
        return f"{_f(v[key], digits)} [{_f(v['low'], digits)}, {_f(v['high'], digits)}] ({v['n']})"

    per_method = []
    for method, v in summary["summary"].items():
        per_method.append(
            [method, str(v["concepts"]), ci(v["hit_at_1"], "rate", 2)]
            + [ci(v[f"regret_{k}"], "mean") for k in REGRET_KS]
            + [ci(v["spearman"], "mean", 2), ci(v["auto_k_match"], "rate", 2), ci(v["auto_k_miss"], "mean_abs", 2)])
    tables = [
        ("The search, per concept", "",
         ["category", "concept", "baseline (95% CI)", "best block", "drop", "best pair", "drop", "greedy 4", "drop",
          "oracle K"], search),
        ("Methods, per concept", "",
         ["category", "concept", "method", "top-1", "hit@1", "regret@1", "regret@2", "regret@4", "spearman",
          "pair rank", "auto K", "oracle K"], methods),
        ("Per method",
         (f"hit@1 over concepts whose best single block drops presence >= {STRONG_DROP}; auto-K match and mean "
          f"|miss| over concepts whose oracle K is <= {MAX_K}; regret@4 against the greedy set. Brackets: 95% "
          "confidence interval over concepts (Wilson for rates, normal approximation for means); (n) concepts."),
         ["method", "concepts", "hit@1 (n)", "regret@1 (n)", "regret@2 (n)", "regret@4 (n)", "spearman (n)",
          "auto-K match (n)", "mean abs miss (n)"], per_method),
    ]
    return intro, tables


def summary_markdown(summary: dict) -> str:
    """summary.md: the tables of `summary_tables`."""
    intro, tables = summary_tables(summary)
    lines = ["# Localization ground truth (toy world)", "", intro]
    for heading, text, header, rows in tables:
        lines += ["", f"## {heading}", ""] + ([text, ""] if text else []) + _table(header, rows)
    if summary["incomplete"]:
        lines += ["", f"Incomplete (not in the tables): {len(summary['incomplete'])}; rerun the same command to finish."]
    return "\n".join(lines) + "\n"
