"""The run: measure every condition a concept needs, localize it by every method, resumably."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..._io import OutputLock, write_json
from ..._version import __version__
from ...errors import DitlocError
from ..plan import ConceptPlan
from ..runner import generate_scored
from ..store import ResultStore
from .joint import (
    CLEAN,
    JOINT_FILE,
    JointCondition,
    joint_conditions,
    read_joint,
    streams,
)
from .metrics import _in_order, greedy_sets, method_conditions, oracle_result
from .settings import (
    FORMAT,
    LOCALIZATIONS_FILE,
    MAX_K,
    METHODS,
    SCREEN_FIRST,
    SEARCH_METHODS,
    SEARCH_SEEDS,
    SEARCH_STEPS,
    SETTINGS_FILE,
    STORE_FILE,
    GroundTruthSettings,
    _concept_record,
    _read_record,
    check_ground_truth_dir,
    localization_file,
    plan_ground_truth,
    sample_calls,
    samples,
    screen_indices,
    screen_margin,
    search_prompt_indices,
)
from .store import (
    _localization_record,
    _presences,
    _scores_of,
    read_conditions,
    read_localizations,
)
from .summary import summarize_ground_truth

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


#: within a batch of conditions, a progress line at most this often (seconds): a raced step can run for an hour
PROGRESS_EVERY = 60.0


def _fmt_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def expected_conditions(n_blocks: int, n_methods: int, max_k: int = MAX_K, n_joint: int = 0) -> int:
    """An upper bound on one concept's conditions: baseline, singles, pairs, the greedy
    steps above 2, each method's top-3 .. top-(max K) sets, and `n_joint` joint-attention
    conditions (`joint.joint_conditions`)."""
    greedy = sum(n_blocks - k + 1 for k in range(3, min(max_k, n_blocks) + 1))
    return (1 + n_blocks + n_blocks * (n_blocks - 1) // 2 + greedy + n_methods * max(0, min(max_k, n_blocks) - 2)
            + n_joint)


class _Run:
    """One call's state: the pipeline, the store, the cache and the progress line."""

    def __init__(self, pipe, out: Path, settings: GroundTruthSettings, evaluator, blocks: list[str], say, n_concepts,
                 joint: bool = False):
        self.pipe, self.out, self.settings, self.evaluator, self.blocks, self.say = (
            pipe, out, settings, evaluator, blocks, say)
        self.store = ResultStore(out / STORE_FILE)
        self.screened: dict = {}  # ((category, concept), condition) -> image indices, for conditions at their screen
        self.cache = read_conditions(out, self.screened)
        self.loc_store = ResultStore(out / LOCALIZATIONS_FILE)
        self.locs = read_localizations(out)
        # joint attention (a pooled text vector): the pooled-vector and stream conditions, joint.py
        self.joint = joint
        self.joint_store = ResultStore(out / JOINT_FILE)
        self.joint_cache = read_joint(out)
        self.t0 = time.time()
        self.ran = self.reused = self.localized = 0
        n_joint = 6 + 2 * len(streams(blocks)) if joint else 0
        self.expected = n_concepts * expected_conditions(len(blocks), len(settings.methods), n_joint=n_joint)
        self.seen = 0  # conditions of this call's concepts so far, run or reused
        self.counted: set = set()

    def localization(self, c: ConceptPlan, method: str) -> dict:
        """The concept's localization record by `method`: from the store, else from its
        file (a run killed between the two), else localized now."""
        from ...localization import Localization, localize

        key = (c.category, c.concept, method)
        if key in self.locs:
            return self.locs[key]
        path = self.out / localization_file(c.category, c.slug, method)
        if path.exists():
            loc = Localization.load(path)
        elif method in SEARCH_METHODS:
            loc = self._search(c, method, path)
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

    def _search(self, c: ConceptPlan, method: str, path: Path):
        """The set-level search on SEARCH_PROMPTS localization prompts x SEARCH_SEEDS at SEARCH_STEPS steps
        (resumable: every evaluated set is kept in `searches/`)."""
        from ...localization import SearchConfig, search

        s, t = self.settings, time.time()
        idx = search_prompt_indices(len(c.localization_prompts))
        checkpoint = self.out / "searches" / Path(localization_file(c.category, c.slug, method)).with_suffix(".jsonl")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        loc = search(self.pipe, [c.localization_prompts[i] for i in idx], c.concept,
                     config=SearchConfig(objective=SEARCH_METHODS[method], max_k=MAX_K)  # the default search
                     if method.startswith("search-gradient") else
                     SearchConfig(objective=SEARCH_METHODS[method], max_k=MAX_K, search_steps=SEARCH_STEPS,
                                  rank="generation"),  # the exhaustive greedy: the reference
                     evaluator=self.evaluator, eval_text=c.eval_text,
                     clean_prompts=[c.localization_clean_prompts[i] for i in idx], seed=list(SEARCH_SEEDS),
                     options=s.run_options, checkpoint=checkpoint)
        loc.save(path)
        self.localized += 1
        self.say(f"ground-truth {c.category}/{c.concept}: localized by {method} ({time.time() - t:.1f}s, "
                 f"{loc.search.cost['generations']} generations)")
        return loc

    def measure(self, c: ConceptPlan, conditions: list[frozenset], label: str, *,
                screen: bool = False) -> dict[frozenset, float]:
        """Generate and score every condition not in the cache (completing one stopped at its
        screen); `screen`: only the screen's images of those not measured yet. The concept's presences."""
        key = (c.category, c.concept)
        cached = self.cache.setdefault(key, {})
        todo = list(dict.fromkeys(s for s in conditions if s not in cached or (
            not screen and (key, s) in self.screened)))
        fresh = {(key, s) for s in conditions} - self.counted  # each condition is counted once
        self.reused += sum(1 for _, s in fresh if s in cached)
        self.seen += len(fresh)
        self.counted |= fresh
        t_batch = t_said = time.time()
        n = self.settings.n_images
        for i, s in enumerate(todo):
            if i and time.time() - t_said >= PROGRESS_EVERY:
                t_said = time.time()
                self.say(f"ground-truth {c.category}/{c.concept}: {label}, {i}/{len(todo)} condition(s) in "
                         f"{t_said - t_batch:.0f}s")
            record = {"category": c.category, "concept": c.concept, "blocks": _in_order(s, self.blocks)}
            if screen:
                indices = screen_indices(n, self.settings.screen)
                scores = self._generate(c, s, indices=indices)
                record["screen"] = indices
                self.screened[key, s] = indices
            elif (key, s) in self.screened:  # complete it: the images its screen did not measure
                have = dict(zip(self.screened.pop((key, s)), cached[s]))
                rest = [i for i in range(n) if i not in have]
                have.update(zip(rest, self._generate(c, s, indices=rest)))
                scores = [have[i] for i in range(n)]
            else:
                scores = self._generate(c, s)
            self.store.append(record | {"presence": float(np.mean(scores)), "scores": scores})
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

    def race(self, c: ConceptPlan, conditions: list[frozenset], label: str) -> dict[frozenset, float]:
        """Measure `conditions`, of which only the lowest presence matters (a search step).
        With a screen: first the SCREEN_FIRST most promising (fewest presence by the single
        blocks' drops, added) on all images; if even their best lies within `screen_margin` of
        the highest presence a screen can read (1), no screen could stop anything and the rest
        are measured on all images too. Otherwise every other one is screened and, lowest
        screened mean first, completed until the next screened mean lies `screen_margin` above
        the best completed presence (those left keep their screened mean)."""
        if self.settings.screen is None:
            return self.measure(c, conditions, label)
        key = (c.category, c.concept)
        cached, margin = self.cache[key], screen_margin(self.settings.screen)
        base = float(np.mean(cached[frozenset()]))
        drop = {b: base - float(np.mean(cached[frozenset({b})])) for b in self.blocks}
        conditions = list(dict.fromkeys(conditions))
        first = sorted(conditions, key=lambda s: -sum(drop[b] for b in s))[:SCREEN_FIRST]  # stable: ties in order
        self.measure(c, first, f"{label}, the {len(first)} most promising")
        if min(float(np.mean(cached[s])) for s in first) + margin >= 1.0:
            return self.measure(c, conditions, f"{label}, all (no screen could stop one)")
        self.measure(c, conditions, f"{label}, screened on {self.settings.screen} images", screen=True)
        best = math.inf
        for s in sorted(conditions, key=lambda s: float(np.mean(cached[s]))):  # stable: ties in order
            if (key, s) in self.screened:
                if float(np.mean(cached[s])) - margin > best:
                    break
                self.measure(c, [s], f"{label}, completed")
            best = min(best, float(np.mean(cached[s])))
        return _presences(cached)

    def measure_joint(self, c: ConceptPlan, conditions: list[JointCondition]) -> None:
        """Generate and score every joint condition not yet stored (`joint.py`)."""
        cached = self.joint_cache.setdefault((c.category, c.concept), {})
        plain = self.cache.get((c.category, c.concept), {})
        # a set withheld with the clean pooled vector is the ordinary condition: reused from conditions.jsonl
        todo = [x for x in conditions
                if x.key not in cached and not (x.pooled == CLEAN and x.blocks and x.blocks in plain)]
        todo = list({x.key: x for x in reversed(todo)}.values())[::-1]  # one generation per key, the first label
        conditions = list({x.key: x for x in conditions}.values())
        self.reused += len(conditions) - len(todo)
        self.seen += len(conditions)
        t_batch = time.time()
        for x in todo:
            scores = self._generate(c, x.blocks, pooled=x.pooled)
            self.joint_store.append({"category": c.category, "concept": c.concept, "label": x.label,
                                     "blocks": _in_order(x.blocks, self.blocks), "pooled": x.pooled,
                                     "presence": float(np.mean(scores)), "scores": scores})
            cached[x.key] = scores
            self.ran += 1
        if todo:
            self.say(f"ground-truth {c.category}/{c.concept}: pooled vector and streams, {len(todo)} condition(s) in "
                     f"{time.time() - t_batch:.1f}s ({_fmt_seconds(time.time() - self.t0)} elapsed)")

    def _generate(self, c: ConceptPlan, condition: frozenset, pooled: str | None = None,
                  indices: list[int] | None = None) -> list[float]:
        """The condition's scores of its images (`samples` order), or of those at `indices` only."""
        s = self.settings
        # withheld nowhere: the plain generation, unless the pooled vector alone is swapped
        blocks = _in_order(condition, self.blocks) or (None if pooled is None else [])
        generation = {} if pooled is None else {"pooled": pooled}
        if indices is None:
            groups = sample_calls(c, s.n_images)
        else:  # one call per seed, over that seed's prompts (each image's noise is its own seed's)
            every = samples(len(c.evaluation_prompts), s.n_images)
            wanted = [every[i] for i in indices]
            groups = []
            for seed in sorted({seed for _, seed in wanted}):
                prompts = [p for p, x in wanted if x == seed]
                groups.append((dataclasses.replace(c, evaluation_prompts=tuple(c.evaluation_prompts[p] for p in prompts),
                                                   clean_prompts=tuple(c.clean_prompts[p] for p in prompts)), [seed]))
        scores: list[float] = []
        for plan, seeds in groups:
            _, values = generate_scored(self.pipe, plan, blocks, self.evaluator, seeds=seeds,
                                        batch_size=s.batch_size, options=s.run_options, **generation)
            scores += [round(float(v), 6) for v in values]
        if indices is not None:  # back from seed-major to the order asked for
            order = sorted(range(len(wanted)), key=lambda i: (wanted[i][1], i))
            back = dict(zip(order, scores))
            scores = [back[i] for i in range(len(wanted))]
        return scores

    def concept(self, c: ConceptPlan) -> None:
        blocks, methods = self.blocks, self.settings.methods
        locs = {m: self.localization(c, m) for m in methods}
        presence = self.measure(c, [frozenset()] + [frozenset({b}) for b in blocks], "baseline and single blocks")
        presence = self.race(c, [frozenset(p) for p in itertools.combinations(blocks, 2)], "pairs")
        for k in range(3, min(MAX_K, len(blocks)) + 1):
            last = greedy_sets(presence, blocks, k - 1)[-1]
            presence = self.race(c, [last | {b} for b in blocks if b not in last], f"greedy K={k}")
        for m, loc in locs.items():
            if "sets" in loc:  # a set-level search: its own sets
                self.measure(c, [frozenset(x) for x in loc["sets"]], f"{m}'s sets")
                continue
            scores = _scores_of(loc, blocks, f"{c.category}/{c.concept} ({m})")
            self.measure(c, method_conditions(blocks, scores)[1:], f"{m}'s top sets")
        if self.joint:
            oracle = oracle_result(_presences(self.cache[(c.category, c.concept)]), blocks)
            self.measure_joint(c, joint_conditions(blocks, oracle))


def _model_check(pipe) -> dict:
    from ...options import model_record

    return {k: v for k, v in model_record(pipe).items() if k in ("pipeline", "transformer", "dtype")}


def run_ground_truth(pipe, out, settings: GroundTruthSettings | None = None, *, evaluator=None,
                     progress: Callable[[str], None] | None = None) -> GroundTruthResult:
    """Run (or resume) the ground truth of `settings` (default: every toy concept, every
    method) on `pipe` (the toy model) into directory `out`, then write the summary.
    Other settings in `out` are refused before anything is touched; so is a second
    writer (OutputLock)."""
    from ...evaluate import get_evaluator
    from ...options import model_record

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
        record["joint"] = bool(adapter.has_pooled_text)  # joint.py's conditions are measured too
        write_json(out / SETTINGS_FILE, record)
        run = _Run(pipe, out, settings, evaluator, blocks, say, len(concepts), joint=adapter.has_pooled_text)
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
