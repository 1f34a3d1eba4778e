"""`localize`: every localization method by name, the per-block scores (`.scores`) and the
set-level search (`.search`), with one signature and one result type."""

from __future__ import annotations

from ..engine import METHODS as BLOCK_METHODS
from ..errors import DitlocError
from ..options import RunOptions
from .result import Localization
from .scores import block_scores
from .search import search as set_search

#: every localization method: the engine's block scores, and the set-level search (`.search`)
METHODS = BLOCK_METHODS + ("search",)


def localize(
    pipe,
    prompts,
    concept: str,
    *,
    method: str = "search",
    clean_prompts=None,
    seed=0,
    contribution_terms: str = "attn_value_out",
    out_bias: bool = False,
    batch_size: int | None = 8,
    block_batch: int | None = None,
    options: RunOptions | None = None,
    progress=None,
    search=None,
    evaluator=None,
    eval_text: str | None = None,
    checkpoint=None,
    only=None,
    **run,
) -> Localization:
    """Localize `concept`: score every block, or search block sets.

    ``search`` (the default): the set-level search over block sets
    (`ditloc.localization.search`), configured by `search` (a `SearchConfig`), scoring presence
    with `evaluator`/`eval_text` (default: the model's own evaluator, the oracle on the toys)
    or, where there is none, the model itself; resumable through `checkpoint`;
    `block_batch` is then the number of block sets per pipeline call.

    ``contribution``, ``patch`` or ``attribution``: the per-block scores of
    :func:`~ditloc.localization.scores.block_scores` (its doc: the sampled trajectory, `options`, the
    clean prompts, the cost per step), which takes every argument but the search's.
    """
    if method not in METHODS:
        raise DitlocError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "search":
        if contribution_terms != "attn_value_out" or out_bias:
            raise DitlocError("contribution_terms and out_bias are options of method 'contribution', not 'search'")
        return set_search(pipe, prompts, concept, config=search, evaluator=evaluator, eval_text=eval_text,
                          clean_prompts=clean_prompts, seed=seed, block_batch=block_batch, batch_size=batch_size,
                          options=options, checkpoint=checkpoint, progress=progress, only=only, **run)
    if search is not None or evaluator is not None or checkpoint is not None or only is not None:
        raise DitlocError(f"search, evaluator, checkpoint and only are options of method 'search', not {method!r}")
    return block_scores(pipe, prompts, concept, method=method, clean_prompts=clean_prompts, seed=seed,
                        contribution_terms=contribution_terms, out_bias=out_bias, batch_size=batch_size, block_batch=block_batch,
                        options=options, progress=progress, **run)
