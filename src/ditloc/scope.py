"""Where an intervention acts: which blocks, which attention heads in them, and at
which denoising steps the text attention reads the clean prompt.

`Scope.resolve` checks a user's choice against a pipeline's adapter once, before
any work; `Scope.swaps` builds what the instrumented transformer reads during one
pipeline call. `ditloc.generate`, `ditloc.presence` and the `ditloc.withheld` /
`ditloc.injected` contexts share it, so the same arguments mean the same images.

- withhold(B, heads H, steps T): at the steps of T, the heads H of the blocks B
  read the clean prompt; everything else reads the prompt (the plain run).
- inject(B, H, T), its mirror: the prompt is read only by the heads H of the blocks
  B at the steps of T; everything else reads the clean prompt.

Step indices count the transformer's denoising evaluations of a pipeline call
(0-based; one per step with the pipelines' schedulers). The pooled text embedding
of FLUX/SD3, which modulates every block, follows the text at each step: clean
where any head of any block reads the clean prompt (`pooled`: "clean"/"full" fixes
it at the steps of T; outside them a withheld run is plain and an injected one is
the clean prompt's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .engine import StepSwaps, Swap
from .errors import DitlocError

MODES = ("withhold", "inject")


def _index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (torch.is_tensor(value) and value.ndim == 0):
        raise DitlocError(f"{what} must be whole numbers (0-based indices), got {value!r}")
    value = int(value)
    if value < 0:
        raise DitlocError(f"{what} must be 0 or more (0-based indices), got {value}")
    return value


def _indices(values, what: str) -> tuple[int, ...]:
    """A sorted tuple of non-negative indices from an int, an iterable of ints or a comma list ("0,2")."""
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise DitlocError(f"{what} must be a comma-separated list of numbers, e.g. 0,2; got {values!r}") from None
    elif not isinstance(values, (list, tuple, set, frozenset, range)) and not torch.is_tensor(values):
        values = [values]
    return tuple(sorted({_index(v, what) for v in values}))


def _is_per_block(value) -> bool:
    """Whether `value` is a list of head lists (one per block) rather than one list of heads."""
    if isinstance(value, (str, int, range)) or torch.is_tensor(value):
        return False
    items = list(value)
    return bool(items) and all(isinstance(v, (list, tuple, set, frozenset, range, str))
                               or (torch.is_tensor(v) and v.ndim > 0) for v in items)


def head_counts(adapter) -> dict[str, int]:
    """block -> the number of heads of its text attention."""
    return {b: int(adapter.text_attention(b).heads) for b in adapter.block_names()}


def resolve_heads(adapter, listed: list[str], heads) -> dict[str, tuple[int, ...]]:
    """block -> its chosen heads, for the blocks of `listed` (the user's order) that restrict them.

    `heads`: None (every head of every block); one list for every block (ints or "0,2");
    a mapping block -> list (blocks it does not name: every head); or one list per block
    of `listed`, in that order."""
    if heads is None:
        return {}
    counts = head_counts(adapter)
    if isinstance(heads, Mapping):
        chosen = {}
        for block, hs in heads.items():
            if block not in listed:
                known = adapter.resolve_blocks([block])  # an unknown name: the error lists the valid ones
                raise DitlocError(f"heads are given for {known[0]}, which is not intervened on; name heads only "
                                  f"for the chosen blocks ({', '.join(listed) or 'none'})")
            chosen[block] = _indices(hs, "heads")
    elif not _is_per_block(heads):
        chosen = {b: _indices(heads, "heads") for b in listed}
    else:
        per_block = list(heads)
        if len(per_block) != len(listed):
            raise DitlocError(f"got {len(per_block)} head lists for {len(listed)} blocks; give one list per block "
                              "(in the order the blocks are named), one list for every block, or a dict")
        if len(set(listed)) != len(listed):
            raise DitlocError("a block is named twice; give each block once with its head list")
        chosen = {b: _indices(hs, "heads") for b, hs in zip(listed, per_block)}
    for block, hs in chosen.items():
        bad = [h for h in hs if h >= counts[block]]
        if bad:
            raise DitlocError(f"head {bad[0]} is out of range: {block} has {counts[block]} heads "
                              f"(0 ... {counts[block] - 1})")
    return chosen


def resolve_steps(steps) -> frozenset[int] | None:
    """The chosen denoising step indices (None: every step)."""
    return None if steps is None else frozenset(_indices(steps, "steps"))


def check_steps(steps: frozenset[int] | None, n_steps: int) -> None:
    """Refuse a step the run does not have."""
    if steps:
        last = max(steps)
        if last >= n_steps:
            raise DitlocError(f"step {last} is out of range: the run has {n_steps} denoising steps "
                              f"(0 ... {n_steps - 1}); give steps below {n_steps} or sample more steps")


def head_masks(heads: Mapping[str, tuple[int, ...] | None], counts: Mapping[str, int], device) -> dict | None:
    """`Swap.heads`: block -> bool [H] on `device`, for the blocks that read the clean text in some heads only."""
    masks = {}
    for block, hs in heads.items():
        if hs is not None:
            mask = torch.zeros(counts[block], dtype=torch.bool)
            mask[list(hs)] = True
            masks[block] = mask.to(device)
    return masks or None


def _listed(adapter, blocks) -> list[str]:
    """The user's blocks in the order given (validated; "all": model order)."""
    names = adapter.block_names()
    if blocks is None:
        return []
    if isinstance(blocks, str):
        blocks = names if blocks == "all" else [b.strip() for b in blocks.split(",") if b.strip()]
    listed = [b.strip() if isinstance(b, str) else b for b in blocks]
    adapter.resolve_blocks(listed)
    return listed


@dataclass(frozen=True)
class Scope:
    """One intervention, resolved against a pipeline (see the module docstring)."""

    mode: str  # "withhold" or "inject"
    blocks: tuple[str, ...]  # the chosen blocks, model order
    heads: Mapping[str, tuple[int, ...]]  # chosen block -> its chosen heads; blocks not in it: every head
    steps: frozenset[int] | None  # the chosen denoising steps; None: every step
    pooled: str | None  # None, "clean" or "full"
    names: tuple[str, ...]  # every block of the model, in order
    counts: Mapping[str, int]  # block -> heads

    @classmethod
    def resolve(cls, adapter, mode: str, blocks, *, heads=None, steps=None, pooled: str | None = None) -> Scope:
        if mode not in MODES:
            raise DitlocError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if pooled not in (None, "clean", "full"):
            raise DitlocError(f"pooled must be 'clean' or 'full', got {pooled!r}")
        listed = _listed(adapter, blocks)
        chosen = resolve_heads(adapter, listed, heads)
        return cls(mode=mode, blocks=tuple(adapter.resolve_blocks(listed)), heads=chosen,
                   steps=resolve_steps(steps), pooled=pooled, names=tuple(adapter.block_names()),
                   counts=head_counts(adapter))

    def check_steps(self, n_steps: int) -> None:
        check_steps(self.steps, n_steps)

    def clean_heads(self, inside: bool = True) -> dict[str, tuple[int, ...] | None]:
        """block -> the heads that read the clean prompt (None: every head), at a step of
        `steps` (`inside`) or at any other step. Blocks not in it read the prompt."""
        if self.mode == "withhold":
            if not inside:
                return {}
            return {b: self.heads.get(b) for b in self.blocks if self.heads.get(b, True)}
        if not inside:
            return {b: None for b in self.names}
        out: dict[str, tuple[int, ...] | None] = {b: None for b in self.names if b not in self.blocks}
        for b in self.blocks:
            if b in self.heads:
                rest = tuple(h for h in range(self.counts[b]) if h not in self.heads[b])
                if rest:
                    out[b] = rest
        return out

    def pooled_clean(self, inside: bool = True) -> bool:
        """Whether the pooled text embedding is the clean prompt's (models that have one)."""
        if not inside:
            return self.mode == "inject"
        return bool(self.clean_heads(True)) if self.pooled is None else self.pooled == "clean"

    def _sides(self) -> tuple[bool, ...]:
        return (True,) if self.steps is None else (True, False)

    def acts(self, adapter) -> bool:
        """Whether anything reads the clean prompt (else the run is the plain one)."""
        return any(self.clean_heads(side) or (adapter.has_pooled_text and self.pooled_clean(side))
                   for side in self._sides())

    def swap(self, adapter, clean: dict, inside: bool = True) -> Swap | None:
        """The swap of one kind of step; `clean`: `adapter.encode_text` of the clean prompts."""
        heads = self.clean_heads(inside)
        pooled = self.pooled_clean(inside)
        if not heads and not (adapter.has_pooled_text and pooled):
            return None
        swap = adapter.make_swap(frozenset(heads), clean, pooled)
        swap.heads = head_masks(heads, self.counts, adapter.pipe._execution_device)
        return swap

    def swaps(self, adapter, clean: dict) -> tuple[Swap | None, StepSwaps | None]:
        """(swap, schedule) for `Session.begin_call`: one swap for every step, or a schedule by step."""
        if self.steps is None:
            return self.swap(adapter, clean), None
        return None, StepSwaps(self.steps, self.swap(adapter, clean, True), self.swap(adapter, clean, False))

    def to_dict(self) -> dict:
        return {"mode": self.mode, "blocks": list(self.blocks),
                "heads": {b: list(h) for b, h in self.heads.items()} or None,
                "steps": None if self.steps is None else sorted(self.steps), "pooled": self.pooled}
