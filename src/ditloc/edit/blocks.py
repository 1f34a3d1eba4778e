"""Which blocks an edit changes: explicit names, a saved localization, or a localization
run for the edit (``--blocks auto``, by default the set-level search with K from its curve),
and the prompts block choice and preservation draw on (probe-set categories)."""

from __future__ import annotations

import numbers
from pathlib import Path

from ..errors import DitlocError


def _adapter(pipe):
    from ..adapters import get_adapter

    return get_adapter(pipe)


def search_objective(pipe, concept: str, *, objective: str | None = None, evaluator=None,
                     eval_text: str | None = None) -> tuple[str, object]:
    """(objective, evaluator) the search for `concept` runs with, decided as `ditloc.localization.search`
    decides it: `objective` as given; else "evaluator" where `evaluator` is given or the model has
    one (the toy's oracle) and it can score `eval_text` (default: the concept), else "self" (the
    model judges itself). The edit commands print it before the run, and pass it to the search."""
    from ..localization import default_evaluator

    if objective == "self":
        return "self", None
    candidate = evaluator if evaluator is not None else default_evaluator(pipe)
    if objective is None and candidate is not None:
        try:
            candidate.check_text(eval_text if eval_text is not None else concept)
        except DitlocError:
            candidate = None
    if objective is None:
        return ("evaluator", candidate) if candidate is not None else ("self", None)
    return objective, candidate  # "evaluator" without one: the search refuses it in one line


def choose_blocks(pipe, blocks, k, localize_prompts, concept, *, seeds=(0, 1), progress=None, eligible=None,
                  method: str = "search", checkpoint=None, objective: str | None = None, evaluator=None,
                  eval_text: str | None = None, **localize_kw):
    """Block names to edit: explicit names / "all"; a saved localization (a `Localization`
    or its JSON path: search once, edit many times); or "auto" = a localization of
    `concept` on `localize_prompts` by `method` at `seeds`. From a localization, `k` blocks
    ("auto" or None: :meth:`~ditloc.localize.Localization.k_auto`). `eligible`: the
    blocks an edit can change (the search runs over those only; a ranking keeps its first
    k of them). `objective`, `evaluator`, `eval_text`: how the search scores the concept's
    presence (:func:`search_objective`; method "search" only). When the chosen blocks do not
    halve the concept's presence (measured by the search, or by one presence run for the
    block-score methods), `progress` says so in one line, naming the K that would.
    -> (blocks, localization or None)."""
    from ..localization import Localization

    if method != "search" and (objective is not None or evaluator is not None or eval_text is not None):
        raise DitlocError(f"objective, evaluator and eval_text are settings of the search, not of method {method!r}; "
                          "localize with method 'search'")
    if k == "auto":
        k = None
    elif k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral)):
        raise DitlocError(f"k must be a number of blocks or 'auto', got {k!r}")
    adapter = _adapter(pipe)
    names = adapter.block_names()
    saved = isinstance(blocks, Localization) or (isinstance(blocks, (str, Path)) and str(blocks).endswith(".json"))
    if not saved and blocks != "auto":
        if blocks == "all" and eligible is not None:
            blocks = [b for b in names if b in eligible]
        chosen = adapter.resolve_blocks(blocks)
        if not chosen:
            raise DitlocError("no blocks chosen; pass --blocks auto, all, a localization.json or block names")
        return chosen, None
    pool = names if eligible is None else [b for b in names if b in eligible]
    if k is not None and not 1 <= int(k) <= len(pool):
        raise DitlocError(f"--k must be between 1 and {len(pool)} (the number of blocks) with --blocks auto")
    if saved:
        loc = blocks if isinstance(blocks, Localization) else Localization.load(blocks)
        if list(loc.blocks) != names:
            raise DitlocError(f"the localization was measured on a model with other blocks ({', '.join(loc.blocks)}); "
                              "localize this model first")
    else:
        from ..localization import SearchConfig, localize

        if progress:
            progress(f"localizing {concept!r} by {method} on {len(localize_prompts)} prompt(s) x {len(seeds)} seed(s)")
        if method == "search":
            # the default search (docs/search.md), at no more sampling steps than the run's own
            steps = localize_kw["options"].resolve(pipe).effective("num_inference_steps") \
                if localize_kw.get("options") is not None else None
            objective, evaluator = search_objective(pipe, concept, objective=objective, evaluator=evaluator,
                                                    eval_text=eval_text)
            search_steps = SearchConfig().search_steps
            config = SearchConfig(objective=objective, max_k=min(4, len(pool)),
                                  search_steps=min(search_steps, int(steps)) if steps else search_steps)
            localize_kw = {**localize_kw, "search": config, "checkpoint": checkpoint, "only": pool,
                           "evaluator": evaluator, "eval_text": eval_text if objective == "evaluator" else None}
        loc = localize(pipe, localize_prompts, concept, seed=list(seeds), method=method, **localize_kw)
    if loc.search is not None:
        outside = [b for b in loc.search.sets[-1] if b not in pool]
        if outside:
            raise DitlocError(f"the localization's sets hold {outside[0]}, which this edit cannot change; "
                              f"search over the editable blocks ({', '.join(pool)})")
    k = int(k) if k is not None else loc.k_auto()
    # best first (a search's blocks in the order they entered its sets): automatic-K edits take prefixes
    chosen = loc.top(k) if loc.search is not None or eligible is None else [b for b in loc.ranking if b in pool][:k]
    _warn_weak(pipe, loc, chosen, localize_prompts, concept, seeds, progress, localize_kw.get("options"),
               measure=not saved)
    return chosen, loc


def _warn_weak(pipe, loc, chosen, prompts, concept, seeds, progress, options, *, measure: bool) -> None:
    """One line when withholding `chosen` leaves more than half the concept's presence."""
    from ..localization import AUTO_K_DROP

    if progress is None:
        return
    s = loc.search
    if s is not None and len(chosen) <= s.max_k and set(chosen) == set(s.sets[len(chosen) - 1]):
        relative = s.relative_curve[len(chosen) - 1]
    elif measure and s is None:
        from ..localization import PresenceRunner, default_evaluator

        objective = "evaluator" if default_evaluator(pipe) is not None else "self"
        runner = PresenceRunner(pipe, prompts, concept, objective=objective, seed=list(seeds), options=options)
        base, withheld = runner.presence([frozenset(), frozenset(chosen)]).mean(axis=1)
        relative = (base - withheld) / base if base > 0 else 0.0
    else:
        return
    if relative >= AUTO_K_DROP:
        return
    better = s.k_for_drop(AUTO_K_DROP) if s is not None else None
    advice = (f"K = {better} would (--k {better})" if better is not None else
              f"no K up to {s.max_k} does" if s is not None else "localize with method 'search' to find a set that does")
    progress(f"warning: withholding {', '.join(chosen)} lowers {concept!r}'s presence by {relative:.0%} of its "
             f"baseline, less than half; {advice}")


def neighbour_prompts(pipe, concept: str, per_concept: int = 6) -> list[str]:
    """Prompts of the concepts that share `concept`'s probe-set category (the toy set on the
    toy model, LocK's otherwise): `per_concept` localization prompts of each. The closed-form
    edit preserves them by default, so erasing one character leaves the others (measured on the
    toy: anchors only kept the other characters 0.92 of the time, with these 1.00). Empty when
    no probe set knows the concept."""
    from ..probes import load_probe_set
    from ..probes.core import fill
    from ..registry import probe_set_name

    key = concept.strip().lower()
    for category in load_probe_set(probe_set_name(pipe)).categories:
        if key in {c.name.lower() for c in category.concepts}:
            templates = category.localization_prompts[:per_concept]
            return [fill(t, c.text) for c in category.concepts if c.name.lower() != key for t in templates]
    return []


def general_prompts(pipe, per_concept: int = 2) -> list[str]:
    """`per_concept` localization prompts of every concept of every probe-set category (the
    toy set on the toy model, LocK's otherwise): what an erasure's default preservation adds
    beyond the concept's own category, so that attributes of other kinds stay as they are."""
    from ..probes import load_probe_set
    from ..probes.core import fill
    from ..registry import probe_set_name

    out = []
    for category in load_probe_set(probe_set_name(pipe)).categories:
        templates = category.localization_prompts[:per_concept]
        out += [fill(t, c.text) for c in category.concepts for t in templates]
    return out


def category_prompts(category: str, word: str, probes: str = "lock") -> list[str]:
    """A probe-set category's localization templates filled with `word`
    (``auto`` blocks for personalization localized on the subject's category)."""
    from ..probes import load_probe_set
    from ..probes.core import fill

    cat = load_probe_set(probes).category(category)  # unknown -> DitlocError listing the categories
    return [fill(t, word) for t in cat.localization_prompts]
