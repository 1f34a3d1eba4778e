"""Shared plumbing of localize/generate: call arguments, seeds, batching."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from .errors import DitlocError


def as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts:
        raise DitlocError("no prompts given; pass at least one prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DitlocError(f"prompts must be non-empty strings, got {p!r}")
    return prompts


def as_seed_list(seed) -> list[int]:
    seeds = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not seeds:
        raise DitlocError("no seeds given; pass at least one seed")
    return [int(s) for s in seeds]


def prepare(pipe, prompts, seed, *, adapter_options, num_inference_steps, guidance_scale, max_sequence_length,
            pipeline_kwargs):
    """Validated (adapter, prompts, seeds, pipeline call kwargs) for one run."""
    from .adapters import get_adapter

    prompts = as_prompt_list(prompts)
    seeds = as_seed_list(seed)
    adapter = get_adapter(pipe, **(adapter_options or {}))
    kw = call_kwargs(
        adapter,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        max_sequence_length=max_sequence_length,
        extra=pipeline_kwargs,
    )
    return adapter, prompts, seeds, kw


def call_kwargs(adapter, *, num_inference_steps, guidance_scale, max_sequence_length, extra) -> dict:
    """Arguments for `pipe(...)`: the pipeline's defaults where ours are None."""
    if int(num_inference_steps) <= 0:
        raise DitlocError(f"num_inference_steps must be positive, got {num_inference_steps}")
    accepted = inspect.signature(adapter.pipe.__call__).parameters
    ours = {"prompt", "generator", "output_type", "num_inference_steps", "guidance_scale", "max_sequence_length"}
    for name in extra:
        if name in ours:
            raise DitlocError(f"pass {name} as ditloc's own argument, not as a pipeline keyword")
        if name not in accepted or accepted[name].kind is inspect.Parameter.VAR_KEYWORD:
            raise DitlocError(
                f"{type(adapter.pipe).__name__} takes no argument {name!r}; valid ones: "
                + ", ".join(n for n, v in accepted.items() if v.kind is not inspect.Parameter.VAR_KEYWORD and n not in ours)
            )
    kw = {k: v for k, v in adapter.default_call_kwargs().items() if k in accepted}
    kw.update(extra)
    kw["num_inference_steps"] = int(num_inference_steps)
    if guidance_scale is not None:
        kw["guidance_scale"] = float(guidance_scale)
    if max_sequence_length is not None:
        if int(max_sequence_length) <= 0:
            raise DitlocError(f"max_sequence_length must be positive, got {max_sequence_length}")
        kw["max_sequence_length"] = int(max_sequence_length)
    return kw


def effective(adapter, kw: dict, name: str):
    return kw[name] if kw.get(name) is not None else adapter.call_default(name)


def generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per image: each image's trajectory is the one
    `pipe(prompt, generator=torch.Generator(device).manual_seed(seed))` samples."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def chunks(items: list, size: int | None):
    size = len(items) if not size else int(size)
    if size <= 0:
        raise DitlocError(f"batch_size must be positive, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def model_record(pipe) -> dict:
    t = pipe.transformer
    return {
        "pipeline": type(pipe).__name__,
        "transformer": type(t).__name__,
        "name_or_path": getattr(pipe, "name_or_path", None) or getattr(t.config, "_name_or_path", None),
        "dtype": str(t.dtype).replace("torch.", ""),
        "device": str(pipe._execution_device),
    }
