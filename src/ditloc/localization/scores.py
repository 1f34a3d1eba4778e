"""Block scores: rank a DiT's blocks for a concept, measured on the ordinary sampling
trajectory, by one of three methods:

- ``contribution``: how much the concept's text tokens contribute
  to the image tokens' attention output (where the concept is *read*);
- ``patch``: how far withholding the concept from the block alone moves the
  model's prediction toward the clean prompt's (where reading it *matters*);
- ``attribution``: a first-order estimate of ``patch`` for every block from
  one backward pass per step.
"""

from __future__ import annotations

import torch

from ..engine import CAUSAL_METHODS, CONTRIBUTION_TERMS, CausalProbe, Probe, Session, instrument
from ..engine import METHODS as BLOCK_METHODS
from ..errors import DitlocError
from ..offload import check_readable
from ..options import RunOptions, as_prompt_list, as_seed_list, chunks, model_record
from .result import Localization


@torch.no_grad()
def block_scores(
    pipe,
    prompts,
    concept: str,
    *,
    method: str = "contribution",
    clean_prompts=None,
    seed=0,
    contribution_terms: str = "attn_value_out",
    out_bias: bool = False,
    batch_size: int | None = 8,
    block_batch: int | None = None,
    options: RunOptions | None = None,
    progress=None,
    **run,
) -> Localization:
    """Score every block for `concept` by a per-block method.

    The trajectory of each (prompt, seed) is exactly the one
    ``pipe(prompt, num_inference_steps=N, guidance_scale=G,
    generator=torch.Generator(generator_device).manual_seed(seed), max_sequence_length=L)``
    samples. `options` (:class:`~ditloc.options.RunOptions`) says how the pipeline
    is called; keyword arguments override its fields (``num_inference_steps``,
    ``guidance_scale``, ...) or are passed to the pipeline.

    `method`: ``contribution`` (default; `contribution_terms`, `out_bias` choose its form),
    ``patch`` or ``attribution``. The causal methods compare with `clean_prompts`
    (one per prompt; default: the prompt with the concept removed). Cost per
    denoising step, in conditional-row forwards: contribution none extra; patch
    1 + blocks (batched `block_batch` blocks per forward); attribution 2 forwards
    and one backward. Only the conditional half of a CFG batch is measured.
    """
    if method not in BLOCK_METHODS:
        raise DitlocError(f"unknown block method {method!r}; choose one of {', '.join(BLOCK_METHODS)}")
    if contribution_terms not in CONTRIBUTION_TERMS:
        raise DitlocError(f"unknown contribution terms {contribution_terms!r}; choose one of "
                          f"{', '.join(CONTRIBUTION_TERMS)}")
    if block_batch is not None and (not isinstance(block_batch, int) or block_batch < 1):
        raise DitlocError(f"block_batch must be a positive integer, got {block_batch!r}")
    opts = RunOptions.of(options, **run)
    prompts, seeds = as_prompt_list(prompts), as_seed_list(seed)
    resolved = opts.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    spans = [adapter.concept_span(p, concept, kw) for p in prompts]  # validates before any compute
    if method == "contribution" and contribution_terms == "attn_value_out":
        check_readable(pipe.transformer)  # the output projections, read outside their forward
    causal = method in CAUSAL_METHODS
    clean: list[str] | None = None
    if causal:
        from ..text import clean_prompt_list

        clean = clean_prompt_list(prompts, concept, clean_prompts)
    samples = [(i, s) for i in range(len(prompts)) for s in seeds]
    n_blocks = len(adapter.block_names())
    session = Session()
    totals, heads = [], []
    done = 0
    with instrument(adapter, session):
        for chunk in chunks(samples, batch_size):
            call = dict(prompt=[prompts[i] for i, _ in chunk], generator=resolved.generators([s for _, s in chunk]),
                        output_type="latent", **kw)
            if causal:
                text = adapter.encode_text([clean[i] for i, _ in chunk], kw)
                measure = CausalProbe(adapter, session, method, text, block_batch)
                session.begin_call(len(chunk))
                with measure.installed():
                    pipe(**call)
                total = measure.stacked(n_blocks, session.forwards)  # [blocks, steps, n]
                per_head = total.new_zeros(*total.shape, 0)
            else:
                probe = Probe.for_spans([spans[i] for i, _ in chunk], contribution_terms, out_bias)
                probe = probe.to(pipe._execution_device)
                session.begin_call(len(chunk), probe=probe)
                pipe(**call)
                total, per_head = probe.stacked(n_blocks, session.forwards)  # [blocks, steps, n], [.., H]
            totals.append(total)
            heads.append(per_head)
            done += len(chunk)
            if progress is not None:
                progress(done, len(samples))
    record = resolved.record()
    settings = {
        "method": method,
        "model": model_record(pipe),
        "family": adapter.family,
        "adapter_options": record["adapter_options"],
        "prompts": prompts,
        "seeds": seeds,
        "num_inference_steps": record["num_inference_steps"],
        "guidance_scale": record["guidance_scale"],
        "max_sequence_length": record["max_sequence_length"],
        "generator_device": record["generator_device"],
        "pipeline_kwargs": record["pipeline_kwargs"],
    }
    if causal:
        settings["clean_prompts"] = clean
    else:
        settings["contribution_terms"] = contribution_terms
        settings["out_bias"] = bool(out_bias)
    return Localization(
        concept=concept,
        blocks=tuple(adapter.block_names()),
        per_sample_step=torch.cat(totals, dim=2).float(),
        per_head_step=torch.cat(heads, dim=2).float(),
        spans=tuple(spans),
        settings=settings,
    )
