"""How jobs call the pipeline: `RunOptions`, resolved once per run, and the
plumbing every job shares (prompts, seeds, generators, batching, model record)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from .errors import BadOption, DitlocError
from .registry import call_defaults


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


@dataclass(frozen=True)
class RunOptions:
    """How every job (localize, generate, edit, bench) calls the pipeline.

    None means the pipeline's own default (its ``__call__`` signature; on a toy
    model, the arguments it was trained for, see `ditloc.toy`). One resolution
    (:meth:`resolve`) validates them against a pipeline and gives the call
    arguments; nothing downstream repeats the defaults.
    """

    num_inference_steps: int | None = 20
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    generator_device: str = "cpu"  # where each image's torch.Generator lives
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)  # other `pipe(...)` arguments
    adapter_options: Mapping[str, Any] = field(default_factory=dict)  # model-family settings, validated by the adapter

    @classmethod
    def of(cls, options: RunOptions | None = None, **run) -> RunOptions:
        """`options` (or the defaults) with `run`'s overrides: field names set fields,
        any other keyword is a pipeline argument."""
        base = options if options is not None else cls()
        names = {f.name for f in fields(cls)}
        own = {k: v for k, v in run.items() if k in names}
        extra = {k: v for k, v in run.items() if k not in names}
        if "pipeline_kwargs" in own:
            own["pipeline_kwargs"] = dict(own["pipeline_kwargs"] or {})
        if "adapter_options" in own:
            own["adapter_options"] = dict(own["adapter_options"] or {})
        merged = replace(base, **own)
        if extra:
            merged = replace(merged, pipeline_kwargs={**merged.pipeline_kwargs, **extra})
        return merged

    def resolve(self, pipe) -> ResolvedRun:
        """Validate against `pipe` (adapter options, pipeline arguments) before any work."""
        from .adapters import get_adapter

        adapter = get_adapter(pipe, **dict(self.adapter_options))
        return ResolvedRun(adapter, self, call_kwargs(adapter, self))

    def to_dict(self) -> dict:
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            "generator_device": str(self.generator_device),
            "pipeline_kwargs": _jsonable(self.pipeline_kwargs),
            "adapter_options": dict(self.adapter_options),
        }


@dataclass(frozen=True)
class ResolvedRun:
    """RunOptions resolved against one pipeline: its adapter and the exact `pipe(...)` arguments."""

    adapter: Any
    options: RunOptions
    call_kwargs: dict  # everything but prompt, generator and output_type

    def effective(self, name: str):
        """The value the pipeline runs with: ours, else its own default."""
        kw = self.call_kwargs
        return kw[name] if kw.get(name) is not None else self.adapter.call_default(name)

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return generators(seeds, self.options.generator_device)

    def record(self) -> dict:
        """The settings a result file records."""
        return {
            "num_inference_steps": int(self.effective("num_inference_steps")),
            # None where the pipeline's guidance_scale does nothing (the adapter's guidance_argument is another, in pipeline_kwargs)
            "guidance_scale": self.effective("guidance_scale") if self.adapter.uses_guidance_scale else None,
            "max_sequence_length": self.effective("max_sequence_length"),
            "generator_device": str(self.options.generator_device),
            "adapter_options": dict(self.options.adapter_options),
            "pipeline_kwargs": _jsonable(self.call_kwargs),
        }


def _jsonable(kw: Mapping) -> dict:
    return {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool, type(None)))}


def call_kwargs(adapter, options: RunOptions) -> dict:
    """Arguments for `pipe(...)`: the pipeline's defaults where ours are None; on a toy model,
    the arguments it was trained for (`ditloc.registry.KnownModel.call_defaults`) where the caller set none."""
    steps, guidance, max_len = options.num_inference_steps, options.guidance_scale, options.max_sequence_length
    if steps is not None and int(steps) <= 0:
        raise DitlocError(f"num_inference_steps must be positive, got {steps}")
    accepted = inspect.signature(adapter.pipe.__call__).parameters
    ours = {"prompt", "generator", "output_type", "num_inference_steps", "guidance_scale", "max_sequence_length"}
    extra = dict(options.pipeline_kwargs)
    for name in extra:
        if name in ours:
            raise BadOption(f"pass {name} as ditloc's own argument, not as a pipeline keyword")
        if name not in accepted or accepted[name].kind is inspect.Parameter.VAR_KEYWORD:
            raise BadOption(
                f"{type(adapter.pipe).__name__} takes no argument {name!r}; valid ones: "
                + ", ".join(n for n, v in accepted.items() if v.kind is not inspect.Parameter.VAR_KEYWORD and n not in ours)
            )
    toy = {k: v for k, v in call_defaults(adapter.pipe).items() if k in accepted and k not in extra}
    kw = {k: v for k, v in adapter.default_call_kwargs({**toy, **extra}).items() if k in accepted}
    kw.update(toy)
    kw.update(extra)
    if steps is not None:
        kw["num_inference_steps"] = int(steps)
    if guidance is not None:
        if adapter.guidance_argument not in accepted:
            raise BadOption(f"{type(adapter.pipe).__name__} takes no guidance argument "
                              f"{adapter.guidance_argument!r}; leave the guidance scale unset")
        kw[adapter.guidance_argument] = float(guidance)
    if max_len is not None:
        if int(max_len) <= 0:
            raise DitlocError(f"max_sequence_length must be positive, got {max_len}")
        kw["max_sequence_length"] = int(max_len)
    adapter.check_call(kw)
    return kw


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
