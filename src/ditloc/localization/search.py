"""Set-level causal search: for every K up to `max_k`, the K-block set
whose withholding lowers the concept's presence most, and K from the curve.

Per-block scores cannot see knowledge that several blocks hold redundantly: a pair
that erases a character while each of its blocks alone changes nothing scores 0 block
by block. The search scores *sets* by their total effect on the concept's presence
(`ditloc.localization.presence`): greedy forward selection with a beam (each step adds the
block that lowers presence most to each of the `beam` best sets), optionally backward
elimination from all candidates withheld, keeping the better set for each K.

Every evaluated set is appended to `checkpoint` (a JSONL file) as soon as it is
scored: after Ctrl-C or kill -9 the same call resumes without evaluating a set twice.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import OutputLock, ResultStore
from ..errors import DitlocError
from ..options import RunOptions
from .presence import OBJECTIVES, PresenceRunner, default_evaluator
from .result import Localization, SetSearch
from .scores import block_scores

DIRECTIONS = ("forward", "backward", "both")
#: how a forward step chooses the block to add: every candidate set generated ("generation"), or the
#: candidates ranked by conditional attribution at the current set and the best `verify` generated
RANKINGS = ("gradient", "generation")
#: block-score methods that may prune the search's candidates (cheap: a few generations' cost)
CANDIDATE_METHODS = ("attribution", "patch", "contribution")
CHECKPOINT_FORMAT = "ditloc.search/1"


@dataclass(frozen=True)
class SearchConfig:
    """How the set-level search runs.

    - `objective`: "evaluator" (an evaluator's soft presence; the default where the model
      has one, as the toy's oracle, or one is passed) or "self" (the model judges itself);
    - `max_k`: the largest set; `beam`: sets kept per size (1: plain greedy);
    - `direction`: "forward" (greedy selection), "backward" (elimination from all
      candidates withheld) or "both" (the better set per K);
    - `rank`: how a forward step picks the block to add. "gradient": one
      generation of the current set with conditional attribution ranks every remaining block
      (the first-order effect of withholding it too, given the set withheld), and only the
      `verify` best are generated as sets; the cost does not grow with the number of
      blocks. "generation": every remaining candidate is generated as a set (exact greedy);
    - `verify`: sets generated per forward step under "gradient";
    - `gradient_steps`: the attribution is measured at this many denoising steps, evenly
      spread inside the run (None: at every step);
    - `gradient_gate`: where the derivative is taken: the set's own gates at 1, every other
      block's at this value. At 0 a block whose effect is masked by a backup reads ~0; half
      way, each block's derivative is taken with the others half withheld, so blocks that
      hold the concept together rank first;
    - `candidates`: search only the M blocks ranked best by `candidate_method` (None: all);
      under rank "generation" the result's block scores are the candidates' single-block
      drops, the other blocks' NaN (not measured); under "gradient" the attribution at the
      baseline scores every block;
    - `search_steps`: sampling steps of the search's generations (None: the run's own);
    - `stop_drop`: stop growing the set once S_K removes this fraction of the baseline
      presence (forward search only; None: every K up to `max_k`). The curve then ends at
      that K: enough for a K chosen by a drop of at most `stop_drop`, at a fraction of the cost.
    """

    objective: str | None = None
    max_k: int = 4
    beam: int = 1
    direction: str = "forward"
    rank: str = "gradient"
    verify: int = 2
    gradient_steps: int | None = 2
    gradient_gate: float = 0.5
    candidates: int | None = None
    candidate_method: str = "contribution"
    search_steps: int | None = 6
    stop_drop: float | None = None

    def check(self, n_blocks: int | None = None) -> None:
        """A one-line DitlocError for any bad field (before a model loads: `n_blocks` None
        skips the checks that need the model)."""
        def positive(name, value):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DitlocError(f"{name} must be a positive integer, got {value!r}")

        if self.objective is not None and self.objective not in OBJECTIVES:
            raise DitlocError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        positive("max_k", self.max_k)
        positive("beam", self.beam)
        if self.direction not in DIRECTIONS:
            raise DitlocError(f"unknown search direction {self.direction!r}; choose one of {', '.join(DIRECTIONS)}")
        if self.rank not in RANKINGS:
            raise DitlocError(f"unknown search ranking {self.rank!r}; choose one of {', '.join(RANKINGS)}")
        positive("verify", self.verify)
        if self.gradient_steps is not None:
            positive("gradient_steps", self.gradient_steps)
        if isinstance(self.gradient_gate, bool) or not isinstance(self.gradient_gate, (int, float)) \
                or not 0 <= self.gradient_gate < 1:
            raise DitlocError(f"gradient_gate must be in [0, 1), got {self.gradient_gate!r}")
        if self.candidates is not None:
            positive("candidates", self.candidates)
            if self.candidates < self.max_k:
                raise DitlocError(f"candidates ({self.candidates}) must be at least max_k ({self.max_k}): "
                                  "a K-block set needs K candidates")
        if self.candidate_method not in CANDIDATE_METHODS:
            raise DitlocError(f"unknown candidate method {self.candidate_method!r}; "
                              f"choose one of {', '.join(CANDIDATE_METHODS)}")
        if self.search_steps is not None:
            positive("search_steps", self.search_steps)
        if self.stop_drop is not None:
            if isinstance(self.stop_drop, bool) or not isinstance(self.stop_drop, (int, float)) \
                    or not 0 < self.stop_drop <= 1:
                raise DitlocError(f"stop_drop must be in (0, 1], got {self.stop_drop!r}")
            if self.direction != "forward":
                raise DitlocError("stop_drop stops a forward search; use direction 'forward' with it")
        if n_blocks is not None:
            if self.max_k > n_blocks:
                raise DitlocError(f"max_k must be between 1 and {n_blocks} (the number of blocks), got {self.max_k}")
            if self.candidates is not None and self.candidates > n_blocks:
                raise DitlocError(f"candidates must be at most {n_blocks} (the number of blocks), got {self.candidates}")


class _Checkpoint:
    """The search's on-disk record: a header line (what is searched) and one line per
    evaluated set with its raw per-image values and the seconds the search ran since the
    line before (a resumed search's time is its runs' time together)."""

    def __init__(self, path, identity: dict):
        self.path = Path(path)
        self.identity = identity
        self.store = ResultStore(self.path)
        self.seconds = 0.0  # the loaded lines' seconds

    def load(self) -> list[tuple[list[str], list[float], list[float] | None]]:
        records = ResultStore.read(self.path)
        if not records:
            self.store.append({"format": CHECKPOINT_FORMAT, "identity": self.identity})
            return []
        head = records[0]
        if head.get("format") != CHECKPOINT_FORMAT:
            raise DitlocError(f"{self.path} is not a ditloc search checkpoint; use another path")
        if head.get("identity") != self.identity:
            diffs = sorted(k for k in set(self.identity) | set(head.get("identity", {}))
                           if self.identity.get(k) != head.get("identity", {}).get(k))
            raise DitlocError(f"{self.path} holds a search with other settings ({', '.join(diffs[:4])}); "
                              "use another checkpoint path or the same settings")
        self.seconds = sum(float(r.get("seconds", 0.0)) for r in records[1:])
        return [(r["set"], r["values"], r.get("gradient")) for r in records[1:]]

    def append(self, blocks, values, gradient=None, seconds: float = 0.0) -> None:
        record = {"set": list(blocks), "values": [float(v) for v in values], "seconds": round(seconds, 3)}
        if gradient is not None:  # [blocks, samples]
            record["gradient"] = [[float(v) for v in row] for row in gradient]
        self.store.append(record)


def checkpoint_generations(path) -> int:
    """The generations a search checkpoint holds (one per stored set; 0: none there): a run that
    resumes from it generates the cost it records less these."""
    return max(0, len(ResultStore.read(path)) - 1)


def _ordered(s, order: list[str]) -> tuple[str, ...]:
    return tuple(sorted(s, key=order.index))


@torch.no_grad()
def search(pipe, prompts, concept: str, *, config: SearchConfig | None = None, evaluator=None,
           eval_text: str | None = None, clean_prompts=None, seed=0, block_batch: int | None = None,
           batch_size: int | None = None, pooled: str | None = None, options: RunOptions | None = None,
           checkpoint=None, progress=None, only=None, **run) -> Localization:
    """Set-level search for `concept`: a `Localization` whose `search`
    holds S_K and its presence for K = 1..max_k, and whose `top(k)` is S_k.

    Prompts, seeds and run options are those of `ditloc.localize` (the search's
    generations use `config.search_steps` steps when given). `progress(done, total,
` is called after each evaluated set; `checkpoint`: a JSONL path that makes
    the search resumable (one writer at a time). `only`: search these blocks only (e.g. the
    blocks an edit can change).
    """
    config = config or SearchConfig()
    if not isinstance(config, SearchConfig):
        raise DitlocError(f"config must be a SearchConfig, got {type(config).__name__}")
    opts = RunOptions.of(options, **run)
    adapter = opts.resolve(pipe).adapter
    pool = adapter.resolve_blocks(list(only)) if only is not None else adapter.block_names()
    if not pool:
        raise DitlocError("no blocks to search; `only` is empty")
    n_blocks = len(pool)
    config.check(n_blocks)
    objective = config.objective
    if objective is None:  # an evaluator where one is given or built in and can score the concept, else self
        candidate = evaluator if evaluator is not None else default_evaluator(pipe)
        objective = "evaluator" if candidate is not None and _can_score(candidate, eval_text or concept) else "self"
        evaluator = candidate if objective == "evaluator" else None
    if config.search_steps is not None:
        opts = RunOptions.of(opts, num_inference_steps=config.search_steps)
    runner = PresenceRunner(pipe, prompts, concept, objective=objective, evaluator=evaluator, eval_text=eval_text,
                            clean_prompts=clean_prompts, seed=seed, block_batch=block_batch, batch_size=batch_size,
                            pooled=pooled, options=opts)
    steps = int(runner.resolved.record()["num_inference_steps"])
    runner.gradient_steps = gradient_steps(steps, config.gradient_steps)
    runner.gradient_gate = float(config.gradient_gate)
    names = runner.names
    spans = tuple(runner.adapter.concept_span(p, concept, runner.kw) for p in runner.prompts)
    start = time.perf_counter()

    candidates, candidate_seconds = list(pool), 0.0
    if config.candidates is not None and config.candidates < len(pool):
        t0 = time.perf_counter()
        cheap = block_scores(pipe, runner.prompts, concept, method=config.candidate_method, clean_prompts=runner.clean,
                         seed=runner.seeds, options=opts)
        candidate_seconds = time.perf_counter() - t0
        chosen = set([b for b in cheap.ranking if b in pool][: config.candidates])
        candidates = [b for b in names if b in chosen]

    identity = {"concept": concept, **{k: v for k, v in runner.settings().items() if k != "model"},
                "model": runner.settings()["model"]["name_or_path"], "candidates": candidates}
    if config.rank == "gradient":  # the checkpoint keeps attributions, which these settings change
        steps_at = None if runner.gradient_steps is None else list(runner.gradient_steps)
        identity["gradient"] = {"steps": steps_at, "gate": runner.gradient_gate,
                                "objective": "presence" if runner.gradient_objective is not None else "prediction"}
    lock = None
    store = None
    earlier_seconds = 0.0  # the time of the runs before this one (a resumed search)
    procs = runner.processes  # under accelerate launch: the main process alone holds the lock and writes
    if checkpoint is not None:
        path = Path(checkpoint)

        def load():
            nonlocal lock, store
            try:
                lock = OutputLock(path.parent, name=path.name + ".lock")
                lock.__enter__()
                store = _Checkpoint(path, identity)
                return "ok", (store.load(), store.seconds)
            except DitlocError as e:  # said by every process, not left waiting on the main one
                if lock is not None:
                    lock.__exit__(None, None, None)
                lock = store = None
                return "error", str(e)

        status, loaded = procs.share(load)
        if status == "error":
            raise DitlocError(loaded)
        records, earlier_seconds = loaded
        for blocks, values, gradient in records:
            runner.remember(blocks, values, gradient)
    try:
        total = _planned(len(candidates), config, objective)
        done = [0]
        stamp = [start]  # when the last set was stored

        def on_set(blocks, values, gradient=None):
            if store is not None:
                now = time.perf_counter()
                store.append(_ordered(blocks, names), values, gradient, seconds=now - stamp[0])
                stamp[0] = now
            done[0] += 1
            if progress is not None and procs.is_main:  # a set measured again for its attribution adds one
                progress(done[0], max(total, done[0]))

        def mean(sets, gradient=False) -> list[float]:
            return runner.presence(sets, on_set, gradient).mean(axis=1).tolist()

        best: dict[int, tuple[tuple[str, ...], float]] = {}
        stop = None
        if config.stop_drop is not None:
            base = mean([frozenset()])[0]

            def stop(value: float) -> bool:
                return base > 0 and (base - value) / base >= config.stop_drop

        if config.direction in ("forward", "both") and config.rank == "gradient":
            _forward_ranked(candidates, config, mean, runner.gradient, best, names, stop)
        elif config.direction in ("forward", "both"):
            _forward(candidates, config, mean, best, names, stop)
        if config.direction in ("backward", "both"):
            _backward(candidates, config, mean, best, names)
        baseline = mean([frozenset()])[0]
        singles = {b: p for b, p in zip(candidates, mean([frozenset([b]) for b in candidates]))} \
            if all(runner.known([b]) for b in candidates) else {}
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)

    evaluated_sets = runner.evaluated_sets()
    evaluated = tuple((_ordered(s, names), p) for s, p in zip(evaluated_sets, mean(evaluated_sets)))
    ks = sorted(best)
    result = SetSearch(
        objective=objective, baseline=baseline, sets=tuple(best[k][0] for k in ks),
        presence=tuple(best[k][1] for k in ks), evaluated=evaluated,
        cost={"generations": runner.generations, "gradient_generations": runner.gradient_generations,
              "sets_evaluated": len(evaluated),
              "search_steps": runner.resolved.record()["num_inference_steps"],
              "seconds": round(earlier_seconds + time.perf_counter() - start, 3),
              "candidate_seconds": round(candidate_seconds, 3)},
    )
    n = len(runner.samples)
    drops = torch.full((len(names), 1, n), math.nan)  # a block left NaN was not measured (never 0: no effect)
    attribution = runner.gradient_per_image(frozenset())
    if singles:  # every single block generated: the scores are their presence drops
        per_image = runner.presence([frozenset()] + [frozenset([b]) for b in candidates])
        for i, b in enumerate(candidates):
            drops[names.index(b), 0] = torch.from_numpy(per_image[0] - per_image[i + 1]).float()
        scores = "single-block presence drop"
    elif attribution is not None:  # a gradient-ranked search: its first ranking, on every block
        drops[:, 0] = torch.from_numpy(attribution).float()
        scores = "attribution at the baseline (first-order presence drop, other gates half way)"
    else:
        scores = None
    settings = {**runner.settings(), "method": "search", "search": asdict(config), "objective": objective,
                "candidates": candidates, "scores": scores}
    return Localization(concept=concept, blocks=tuple(names), per_sample_step=drops,
                        per_head_step=drops.new_zeros(*drops.shape, 0), spans=spans, settings=settings, search=result)


def gradient_steps(steps: int, count: int | None) -> tuple[int, ...] | None:
    """`count` step indices evenly spread inside a run of `steps` (None: every step): 1 of 6 is
    step 3, 2 of 6 steps 2 and 4."""
    if count is None or count >= steps:
        return None
    return tuple(sorted({min(steps - 1, round((i + 1) * steps / (count + 1))) for i in range(count)}))


def _can_score(evaluator, text: str) -> bool:
    try:
        evaluator.check_text(text)
    except DitlocError:
        return False
    return True


def _planned(m: int, config: SearchConfig, objective: str) -> int:
    """Sets the search evaluates at most (the progress total), the baseline (and for the self
    objective the clean prompt's images) included."""
    total = 2 if objective == "self" else 1
    if config.direction in ("forward", "both") and config.rank == "gradient":
        # each step: the verified sets (a kept set measured again with attribution only when it surprised)
        total += sum(
            min(config.beam * config.verify, config.beam * (m - k), math.comb(m, k + 1)) for k in range(config.max_k))
    elif config.direction in ("forward", "both"):
        total += sum(min(config.beam * (m - k), math.comb(m, k + 1)) for k in range(config.max_k))
    if config.direction in ("backward", "both"):
        total += 1 + sum(range(2, m + 1))
    return total


def _keep(best: dict, k: int, blocks: tuple[str, ...], value: float) -> None:
    if k not in best or value < best[k][1] - 1e-12:
        best[k] = (blocks, value)


def _forward(candidates: list[str], config: SearchConfig, mean, best: dict, names: list[str], stop=None) -> None:
    """Greedy forward selection with a beam: each size adds one block to each kept set;
    `stop(presence)` True ends it at that size."""
    beam: list[tuple[str, ...]] = [()]
    for k in range(1, config.max_k + 1):
        grown: dict[frozenset, tuple[str, ...]] = {}
        for s in beam:
            for b in candidates:
                if b not in s:
                    grown.setdefault(frozenset(s + (b,)), s + (b,))
        sets = list(grown)
        values = mean(sets)
        # lowest presence first; ties: the set whose blocks come first in model order
        order = sorted(range(len(sets)), key=lambda i: (values[i], sorted(names.index(b) for b in sets[i])))
        beam = [grown[sets[i]] for i in order[: config.beam]]
        _keep(best, k, beam[0], values[order[0]])
        if stop is not None and stop(values[order[0]]):
            break


def _forward_ranked(candidates: list[str], config: SearchConfig, mean, gradient, best: dict, names: list[str],
                    stop=None) -> None:
    """Greedy forward selection in which conditional attribution proposes:
    a kept set's attribution ranks every remaining candidate by its first-order effect given
    the set withheld, and the `verify` best additions are generated as sets; the lowest
    presence wins. The attribution is measured while a set is generated, for the set the
    ranking expects to win (and again for another winner, only then). With a beam, each kept
    set proposes its own `verify` additions."""
    beam: list[tuple[str, ...]] = [()]
    mean([frozenset()], gradient=True)  # the baseline, with its attribution
    for k in range(1, config.max_k + 1):
        last = k == config.max_k
        mean([frozenset(s) for s in beam], gradient=True)  # measured already, except after a surprise
        grown: dict[frozenset, tuple[str, ...]] = {}
        expected: list[frozenset] = []  # each kept set's first proposal
        for s in beam:
            score = gradient(s)
            # largest first-order drop first; ties: model order
            order = sorted((b for b in candidates if b not in s), key=lambda b: (-score[b], names.index(b)))
            for i, b in enumerate(order[: config.verify]):
                key = frozenset(s + (b,))
                grown.setdefault(key, s + (b,))
                if i == 0 and key not in expected:
                    expected.append(key)
        sets = list(grown)
        values = dict(zip(sets, mean(sets, gradient=() if last else expected)))  # one round of calls
        order = sorted(sets, key=lambda x: (values[x], sorted(names.index(b) for b in x)))
        beam = [grown[x] for x in order[: config.beam]]
        _keep(best, k, beam[0], values[order[0]])
        if stop is not None and stop(values[order[0]]):
            break


def _backward(candidates: list[str], config: SearchConfig, mean, best: dict, names: list[str]) -> None:
    """Backward elimination: from every candidate withheld, drop the block whose return
    raises presence least, down to one block."""
    current = tuple(candidates)
    value = mean([frozenset(current)])[0]
    if len(current) <= config.max_k:
        _keep(best, len(current), current, value)
    while len(current) > 1:
        options = [tuple(b for b in current if b != x) for x in current]
        values = mean([frozenset(s) for s in options])
        i = min(range(len(options)), key=lambda j: (values[j], j))
        current, value = options[i], values[i]
        if len(current) <= config.max_k:
            _keep(best, len(current), current, value)
