"""Intervene: generate with a concept withheld from, or injected into, a set of
blocks. Cross-attention models swap the text conditioning that
`attn2` reads in the chosen blocks; everything else runs as usual. The clean prompt
a withholding reads in the concept's place comes from `ditloc.text.derive_clean_prompt`."""

from __future__ import annotations

import numpy as np
import torch

from .engine import Session, instrument
from .errors import DitlocError
from .options import RunOptions, as_prompt_list, as_seed_list, chunks
from .scope import Scope
from .text import clean_prompt_list, derive_clean_prompt  # noqa: F401  (ditloc.intervene.derive_clean_prompt)


def _stack(outputs: list, output_type: str):
    if output_type == "pil":
        return [img for out in outputs for img in out]
    if isinstance(outputs[0], np.ndarray):
        return np.concatenate(outputs)
    return torch.cat(outputs)


@torch.no_grad()
def generate(
    pipe,
    prompts,
    *,
    withhold=None,
    inject=None,
    concept: str | None = None,
    clean_prompts=None,
    heads=None,
    steps=None,
    seed=0,
    output_type: str = "pil",
    batch_size: int | None = None,
    pooled: str | None = None,
    options: RunOptions | None = None,
    **run,
):
    """Images for every (prompt, seed), prompt-major, optionally with the concept
    withheld from (or injected into only) a set of blocks.

    `withhold`/`inject`: block names (or "all"); the blocks in the set see the
    clean prompt (withhold) or the full prompt while all others see the clean one
    (inject). `clean_prompts` (one per prompt) default to the prompt with the
    concept removed. With neither set this is a plain generation.

    `heads`: only these attention heads of the blocks take part (one list for every
    block, one list per block in the order named, or a dict block -> list); `steps`:
    only at these denoising step indices (0-based). Withholding leaves every other
    head and step plain; injection gives them the clean prompt (`ditloc.scope`).

    `pooled` (models with a pooled text embedding that modulates every block,
    `adapter.has_pooled_text`): "clean" or "full" prompt for that embedding. Default: withheld whenever
    any block sees the clean prompt, so withholding nowhere (or injecting
    everywhere) is the plain generation and withholding everywhere (or injecting
    nowhere) is the clean-prompt generation, exactly.

    `options` (:class:`~ditloc.options.RunOptions`) says how the pipeline is
    called; keyword arguments override its fields or are passed to the pipeline.
    """
    if withhold is not None and inject is not None:
        raise DitlocError("choose either withhold or inject, not both")
    intervene = withhold is not None or inject is not None
    if not intervene and (heads is not None or steps is not None):
        raise DitlocError("heads= and steps= narrow an intervention; give withhold= or inject= too")
    opts = RunOptions.of(options, **run)
    prompts, seeds = as_prompt_list(prompts), as_seed_list(seed)
    resolved = opts.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    if pooled not in (None, "clean", "full"):
        raise DitlocError(f"pooled must be 'clean' or 'full', got {pooled!r}")
    scope = None
    clean: list[str] = []
    if intervene:
        mode = "withhold" if withhold is not None else "inject"
        scope = Scope.resolve(adapter, mode, withhold if withhold is not None else inject, heads=heads, steps=steps,
                              pooled=pooled)
        scope.check_steps(int(resolved.effective("num_inference_steps")))
        clean = clean_prompt_list(prompts, concept, clean_prompts)
        if concept is not None:
            for p in prompts:  # the concept must be readable by the model, as in localize
                adapter.concept_span(p, concept, kw)

    samples = [(i, s) for i in range(len(prompts)) for s in seeds]
    outputs = []

    def run_chunk(chunk):
        return pipe(
            prompt=[prompts[i] for i, _ in chunk],
            generator=resolved.generators([s for _, s in chunk]),
            output_type=output_type,
            **kw,
        ).images

    if scope is None:
        return _stack([run_chunk(c) for c in chunks(samples, batch_size)], output_type)
    session = Session()
    with instrument(adapter, session):
        for chunk in chunks(samples, batch_size):
            swap = schedule = None
            if scope.acts(adapter):
                cond = adapter.encode_text([clean[i] for i, _ in chunk], kw)
                swap, schedule = scope.swaps(adapter, cond)
            session.begin_call(len(chunk), swap=swap, schedule=schedule)
            outputs.append(run_chunk(chunk))
    return _stack(outputs, output_type)
