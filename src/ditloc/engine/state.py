"""The runtime state of one instrumented transformer, as small typed pieces.

State lives on objects the processors hold, never in call kwargs: diffusers
drops keyword arguments a processor does not declare, and not every pipeline
forwards `attention_kwargs`. Who writes what:

- `localize` / `generate` start a pipeline call (`Session.begin_call`) and set
  the `Probe` (what to measure) or the swap (what withheld blocks read), or a
  `StepSwaps` schedule of swaps by denoising step (the adapter picks the step's
  swap, `Session.swap_at`);
- the adapter, once per transformer forward, replaces `Session.context` with a
  new immutable `ForwardContext` (and fills its swap's per-forward fields);
- processors read the context and write only measurements (`Probe.record`) or,
  in a joint-attention clean pass, the clean text keys/values (`JointSwap.text_kv`).

Processors never call back into the adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import DitlocError
from .contribution import CONTRIBUTION_TERMS


@dataclass(frozen=True)
class ForwardContext:
    """What every processor needs to know about the current transformer forward."""

    step: int  # transformer forward index within the current pipeline call
    rows: slice | None  # rows of the batch that hold the conditional (prompted) inputs; None when nothing is measured or swapped
    n_text: int = 0  # text tokens in the joint sequence (joint attention)
    key_limit: int | None = None  # text keys at and after this are padding in every row (cross attention)
    active: bool = True  # False for forwards that carry no conditional rows (a separate negative-prompt call)
    measured: bool = True  # False for a forward that takes the swap but is not measured (SD3's skip-layer guidance)


class Probe:
    """What to measure during one pipeline call, and the measurements.

    `positions`/`valid` [n, S]: each image's concept key positions, padded. The
    probe owns its record layout: processors call :meth:`record`, `localize`
    takes :meth:`stacked` tensors.
    """

    def __init__(self, terms: str, out_bias: bool, positions: torch.Tensor, valid: torch.Tensor):
        if terms not in CONTRIBUTION_TERMS:
            raise DitlocError(f"unknown contribution terms {terms!r}; choose one of {', '.join(CONTRIBUTION_TERMS)}")
        self.terms = terms
        self.out_bias = out_bias
        self.positions = positions  # [n, S]
        self.valid = valid  # [n, S]
        #: the largest concept position, on the host (the per-block path never reads device values)
        self.max_position = int(positions.max()) if positions.numel() else 0
        #: (block index, step) -> (total [n], per_head [n, H]), kept on the model's device
        self.records: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_spans(cls, spans, terms: str, out_bias: bool) -> "Probe":
        """A probe for one image per concept span (`ConceptSpan.positions`)."""
        width = max(len(s.positions) for s in spans)
        pos = torch.zeros(len(spans), width, dtype=torch.long)
        valid = torch.zeros(len(spans), width, dtype=torch.bool)
        for i, s in enumerate(spans):
            pos[i, : len(s.positions)] = torch.tensor(s.positions)
            valid[i, : len(s.positions)] = True
        return cls(terms, out_bias, pos, valid)

    def to(self, device) -> "Probe":
        """Positions and validity moved to `device` once per call, not once per block."""
        self.positions = self.positions.to(device)
        self.valid = self.valid.to(device)
        return self

    def record(self, block_index: int, step: int, total: torch.Tensor, per_head: torch.Tensor) -> None:
        self.records[(block_index, step)] = (total, per_head)

    def stacked(self, n_blocks: int, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(totals [blocks, steps, n], per_head [blocks, steps, n, H]) on the CPU; every
        (block, step) must have been measured."""
        missing = [(b, t) for b in range(n_blocks) for t in range(n_steps) if (b, t) not in self.records]
        if missing:
            raise RuntimeError(f"no measurement for (block, step) {missing[0]}; is the text attention bypassed?")
        totals = torch.stack([torch.stack([self.records[(b, t)][0] for t in range(n_steps)]) for b in range(n_blocks)])
        heads = torch.stack([torch.stack([self.records[(b, t)][1] for t in range(n_steps)]) for b in range(n_blocks)])
        return totals.cpu(), heads.cpu()


@dataclass
class Swap:
    """What withheld blocks read instead of the prompt's text.

    `blocks`: the blocks that read the clean prompts' conditioning;
    `clean`: the adapter's `encode_text` of the clean prompts.

    Three refinements, used by the causal localization methods (`ditloc.engine.causal`):
    - `capturing`: the current forward is the clean-prompt pass; each block in
      `blocks` keeps the text conditioning it reads in `text_kv` and nothing is swapped;
    - `row_slices`: block -> the rows of the batch that read the clean conditioning
      (`text_kv`, one row per image) instead of the context's conditional rows;
    - `alpha`: block -> [rows] mixing weights: the block's output for its rows is
      ``full + alpha * (clean - full)`` (differentiable) instead of the clean one.

    And one used by set-level presence (`ditloc.localization.presence`), where each image of
    a call withholds its own block set:
    - `row_masks`: block -> bool [n] on the model's device, over the call's images: the
      images whose conditional row reads the clean conditioning in that block (the others
      read the prompt's); `pooled_rows` (joint attention): bool [n], the images whose
      pooled text embedding is the clean prompt's.

    And one used by head-level interventions (`ditloc.scope`):
    - `heads`: block -> bool [H] on the model's device, the attention heads of that block
      whose image queries read the clean conditioning (the others read the prompt's);
      blocks it does not name read it in every head.
    """

    blocks: frozenset[str]
    clean: dict
    text_kv: dict = field(default_factory=dict)  # per forward: block -> what it read in the clean pass
    capturing: bool = False
    row_slices: dict | None = None
    alpha: dict | None = None
    row_masks: dict | None = None
    heads: dict | None = None

    def heads_of(self, block: str) -> torch.Tensor | None:
        """bool [H]: the heads of `block` that read the clean conditioning (None: every head)."""
        return None if self.heads is None else self.heads.get(block)

    def rows_for(self, block: str, default):
        """The batch rows whose `block` reads the clean conditioning."""
        if self.row_slices is not None and block in self.row_slices:
            return self.row_slices[block]
        return default

    def release(self) -> None:
        self.text_kv = {}
        self.capturing = False


@dataclass
class CrossSwap(Swap):
    """Cross-attention withholding: `blocks` read the clean prompts' text conditioning.

    `clean`: {"embeds", "mask"}. The adapter fills the per-forward fields before each
    forward (`mask` for every row of the batch, and `project`, which gives `states`); with
    `row_slices` the blocks read `text_kv` (states and additive mask captured in a clean
    pass) instead. The states are projected at the first block that reads them
    (:meth:`text_states`), inside the transformer's forward: offloading hooks have loaded
    the projection's weights by then, not yet when the forward pre-hook runs.
    """

    states: torch.Tensor | None = None  # per forward: [B, L, D] as the blocks receive it
    mask: torch.Tensor | None = None  # per forward: additive bias [B, 1, L]
    project: Callable[[], torch.Tensor] | None = None  # per forward: () -> states, run once

    def text_states(self) -> torch.Tensor:
        """The substitute text states [B, L, D] of the current forward (projected on first use)."""
        if self.project is not None:
            self.states, self.project = self.project(), None
        return self.states

    def release(self) -> None:
        super().release()
        self.states = self.mask = self.project = None


class StopForward(Exception):
    """Raised by a processor to end ditloc's own clean-prompt pass early: the blocks
    after the last withheld one cannot change what the withheld blocks read."""


@dataclass
class JointSwap(Swap):
    """Joint-attention withholding: in `blocks`, the image queries of the conditional
    rows read the clean prompts' text keys/values (`text_kv`: block -> (k, v)
    [n, H, L, d]), captured in a clean pass run by the adapter before every forward.

    `clean`: {"embeds", "pooled"}; `pooled_clean`: the pooled text embedding, which
    modulates every block, comes from the clean prompts too.
    """

    pooled_clean: bool = True
    pooled_rows: torch.Tensor | None = None  # bool [n]: per image (set-level presence); None: all or none
    #: the clean-prompt pass stops after this block has kept its keys/values (None: runs to the end)
    stop_after: str | None = None


@dataclass(frozen=True)
class StepSwaps:
    """An intervention that changes with the denoising step: `inside` at the steps in
    `steps`, `outside` at every other step (None: nothing is swapped there)."""

    steps: frozenset[int]
    inside: Swap | None
    outside: Swap | None

    def __call__(self, step: int) -> Swap | None:
        return self.inside if step in self.steps else self.outside


@dataclass
class Session:
    """Shared by every processor installed on one transformer for one run."""

    n_images: int = 0  # images in the current pipeline call
    probe: Probe | None = None
    swap: Swap | None = None
    context: ForwardContext | None = None  # the current forward's, set by the adapter
    forwards: int = 0  # counted transformer forwards of the current call
    call_key: object = None  # identifies the conditional text input of the current call (set by the adapter)
    nested: ForwardContext | None = None  # set while ditloc runs its own extra forwards (causal methods)
    #: per call: values an adapter derives once from the call's inputs (e.g. the text key limit)
    call_cache: dict = field(default_factory=dict)
    #: per call, when the swap changes with the denoising step: the swap of each step (`swap_at`)
    schedule: StepSwaps | None = None

    @property
    def busy(self) -> bool:
        """Something to measure or swap (otherwise forwards need no context rows)."""
        return self.probe is not None or self.swap is not None

    def begin_call(self, n_images: int, *, probe: Probe | None = None, swap: Swap | None = None,
                   schedule: StepSwaps | None = None) -> None:
        self.n_images = n_images
        self.forwards = 0
        self.call_key = None
        self.context = None
        self.call_cache = {}
        if probe is not None:
            self.probe = probe
        elif self.probe is not None:
            self.probe.records = {}
        if self.swap is not None:
            self.swap.release()
        self.swap = swap
        self.schedule = schedule

    def swap_at(self, step: int) -> Swap | None:
        """The swap of denoising step `step`, made the current one (the adapter calls this
        once per forward, when it knows the step); without a schedule, the call's swap."""
        if self.schedule is not None:
            swap = self.schedule(step)
            if swap is not self.swap:
                if self.swap is not None:
                    self.swap.release()
                self.swap = swap
        return self.swap

    def release(self) -> None:
        """Drop per-forward tensors (the instrumentation's exit)."""
        if self.swap is not None:
            self.swap.release()
        self.context = None
