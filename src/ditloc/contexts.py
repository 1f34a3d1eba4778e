"""Interventions around the user's own pipeline call:

    with ditloc.withheld(pipe, ["block.3", "block.7"], "van gogh"):
        images = pipe(prompt="a dog in the style of van gogh").images

Entering installs ditloc's processors and transformer hook (`ditloc.engine.instrument`)
and two wrappers on the pipeline object itself: `pipe.check_inputs`, which every
diffusers pipeline calls first (a call begins), and `pipe.encode_prompt`, whose first
call after it carries the call's prompt and the settings it is encoded with
(`max_sequence_length`, caption cleaning, SANA's instruction, `num_images_per_prompt`).
There the concept is found in the prompt the model reads, the clean prompt derived
(or `clean_prompt` taken) and encoded with the same settings, and the call's
intervention prepared (`ditloc.scope.Scope`): the user's `pipe(...)` then samples
exactly what ``ditloc.generate`` samples for the same prompt, generator and settings.

A call whose prompt could not be read (a pipeline that encodes its prompt some other
way, or `prompt_embeds` instead of `prompt`) is refused before the transformer runs,
never run without the intervention. Leaving the context, also through an exception,
removes exactly what was added; interventions on one pipeline do not nest.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from .adapters import get_adapter
from .engine import Session, instrument
from .errors import DitlocError
from .scope import Scope

_WRAPPED = ("check_inputs", "encode_prompt")


@dataclass
class Intervention:
    """What a `withheld` / `injected` context does, and what the last pipeline call inside it read."""

    scope: Scope
    concept: str | None
    prompts: list[str] = field(default_factory=list)  # the last call's prompts
    clean_prompts: list[str] = field(default_factory=list)  # what the intervened heads and blocks read instead
    calls: int = 0  # pipeline calls intervened on so far


@dataclass
class _CallState:
    pending: bool = False  # a pipeline call has begun; its prompt is not read yet
    ready: bool = False  # the current call's intervention is prepared
    checked: bool = False  # the current call's steps were checked against its schedule


@contextmanager
def withheld(pipe, blocks, concept: str | None = None, *, heads=None, steps=None, clean_prompt=None,
             pooled: str | None = None, adapter_options: Mapping | None = None):
    """Inside the context, `pipe(prompt=...)` generates with `concept` withheld from `blocks`
    (names, a comma list or "all"): those blocks' text attention reads the clean prompt
    (the prompt with the concept removed, :func:`ditloc.derive_clean_prompt`; or
    `clean_prompt`, one per prompt of each call), every other block the prompt.

    `heads`: only these attention heads (one list for every block, one list per block in
    the order named, or a dict block -> list); `steps`: only at these denoising step
    indices (0-based). `pooled` and `adapter_options`: as for :func:`ditloc.generate`.
    Yields an :class:`Intervention` that records what each call read."""
    with _intervention(pipe, "withhold", blocks, concept, heads=heads, steps=steps, clean_prompt=clean_prompt,
                       pooled=pooled, adapter_options=adapter_options) as record:
        yield record


@contextmanager
def injected(pipe, blocks, concept: str | None = None, *, heads=None, steps=None, clean_prompt=None,
             pooled: str | None = None, adapter_options: Mapping | None = None):
    """The mirror of :func:`withheld`: inside the context, `pipe(prompt=...)` reads the prompt
    only in `blocks` (in `heads` of them, at `steps`); everything else reads the clean prompt."""
    with _intervention(pipe, "inject", blocks, concept, heads=heads, steps=steps, clean_prompt=clean_prompt,
                       pooled=pooled, adapter_options=adapter_options) as record:
        yield record


@contextmanager
def _intervention(pipe, mode, blocks, concept, *, heads, steps, clean_prompt, pooled, adapter_options):
    from .intervene import clean_prompt_list

    if any(getattr(vars(pipe).get(name), "_ditloc_context", False) for name in _WRAPPED):
        raise DitlocError("an intervention context is already active on this pipeline; interventions do not nest "
                          "(leave it first, or name all blocks in one context)")
    if concept is None and clean_prompt is None:
        raise DitlocError("an intervention needs the concept or clean_prompt=")
    if concept is not None and (not isinstance(concept, str) or not concept.strip()):
        raise DitlocError(f"the concept must be the words of the prompt to withhold, got {concept!r}")
    fixed_clean = None if clean_prompt is None else [clean_prompt] if isinstance(clean_prompt, str) \
        else list(clean_prompt)
    adapter = get_adapter(pipe, **dict(adapter_options or {}))
    scope = Scope.resolve(adapter, mode, blocks, heads=heads, steps=steps, pooled=pooled)
    record = Intervention(scope=scope, concept=concept)
    session = Session()
    state = _CallState()
    check_inputs, encode_prompt = pipe.check_inputs, pipe.encode_prompt
    signature = inspect.signature(encode_prompt)

    def on_check_inputs(*args, **kwargs):  # a pipeline call begins
        state.pending, state.ready, state.checked = True, False, False
        return check_inputs(*args, **kwargs)

    def on_encode_prompt(*args, **kwargs):
        if state.pending:  # the call's own prompt (a negative prompt encoded separately comes later)
            state.pending = False
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            prepare(dict(bound.arguments))
        return encode_prompt(*args, **kwargs)

    def prepare(settings: dict) -> None:
        """Read the call's prompt, check the concept is in it and prepare what the call reads."""
        prompt = settings.get("prompt")
        if prompt is None:
            raise DitlocError("inside ditloc.withheld()/injected(), call the pipeline with prompt= (the concept is "
                              "found in its text); prompt_embeds cannot be read")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for name in ("prompt_2", "prompt_3"):
            other = settings.get(name)
            if other is not None and ([other] if isinstance(other, str) else list(other)) != prompts:
                raise DitlocError(f"inside ditloc.withheld()/injected(), leave {name} unset (it defaults to the "
                                  "prompt): the clean prompt is derived from prompt= alone")
        if concept is not None:
            for p in prompts:
                adapter.concept_span(p, concept, settings)  # the model must read the concept, as in generate
        clean = clean_prompt_list(prompts, concept, fixed_clean)
        per_prompt = int(settings.get("num_images_per_prompt") or 1)
        swap = schedule = None
        if scope.acts(adapter):
            text = adapter.encode_text(clean, settings)
            if per_prompt > 1:  # the pipelines' layout: each prompt's images side by side
                text = {k: v.repeat_interleave(per_prompt, dim=0) if torch.is_tensor(v) else v
                        for k, v in text.items()}
            swap, schedule = scope.swaps(adapter, text)
        session.begin_call(len(prompts) * per_prompt, swap=swap, schedule=schedule)
        record.prompts, record.clean_prompts = prompts, clean
        record.calls += 1
        state.ready = True

    def guard(module, args, kwargs):
        """Before every transformer forward: refuse a call whose prompt was not read; check the steps."""
        swap = session.swap
        if session.nested is not None or (swap is not None and swap.capturing):  # ditloc's own forwards
            return
        if not state.ready:
            raise DitlocError("ditloc.withheld()/injected() could not read this call's prompt: call the pipeline "
                              "itself, pipe(prompt=...), inside the context (it reads the prompt where the "
                              "pipeline encodes it, in pipe.encode_prompt after pipe.check_inputs)")
        if not state.checked:
            state.checked = True
            scope.check_steps(len(pipe.scheduler.timesteps))

    on_check_inputs._ditloc_context = on_encode_prompt._ditloc_context = True
    with ExitStack() as stack:
        stack.enter_context(instrument(adapter, session))
        handle = adapter.transformer.register_forward_pre_hook(guard, with_kwargs=True, prepend=True)
        stack.callback(handle.remove)
        stack.enter_context(_attribute(pipe, "check_inputs", on_check_inputs))
        stack.enter_context(_attribute(pipe, "encode_prompt", on_encode_prompt))
        yield record


@contextmanager
def _attribute(obj, name: str, value):
    """`obj.name` is `value` inside; afterwards the instance holds exactly what it held before."""
    own = vars(obj)
    had, before = name in own, own.get(name)
    own[name] = value
    try:
        yield
    finally:
        if had:
            own[name] = before
        else:
            own.pop(name, None)
