"""Causal block scores on the plain sampling trajectory.

During an ordinary pipeline call (every image is exactly the one `pipe(...)`
samples), a forward hook on the transformer runs extra forwards on the same
inputs after each of the pipeline's own, on the conditional rows only:

- the **clean pass**: the clean prompts' text conditioning (the clean-prompt
  prediction ε_clean); every block keeps what it reads there (`Swap.text_kv`);
- **patch**: for each block b, the prediction ε_b with block b alone reading the
  clean conditioning (batched: copy g of the rows withholds block g), scored
  E(b) = <ε_full - ε_b, d> / |d|^2 with d = ε_full - ε_clean;
- **attribution**: one differentiable forward in which each block's output is
  ``full + α_b (clean - full)`` and one backward pass: ∂m/∂α_b at α = 0 for every
  block, with m(α) = <ε_full - ε(α), d> / |d|^2 (attribution patching).

Only conditional predictions enter: the unconditional half of a guidance
batch is the same in every variant, so the guidance scale cancels from E.
A sample whose prompt and clean prompt predict the same (d = 0) scores 0.
Nothing here synchronises with the device; scores stay on it until the call ends.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .state import ForwardContext, Session

METHODS = ("contribution", "patch", "attribution")
CAUSAL_METHODS = ("patch", "attribution")
#: default rows of one patch forward (block variants x images), unless the pipeline's own batch is larger
PATCH_ROWS = 64


@contextmanager
def forward_weights():
    """Backward passes read the weights their forward read. Offloading hooks (diffusers' group
    offloading, accelerate's model offload) give a parameter other storage after its module
    ran (``param.data = ...``); autograd keeps a parameter an op saves itself (a norm's
    weight) by reference, so its backward would read the offloaded copy (on another device,
    or empty on disk). Saved parameters are kept as aliases of the storage the forward read."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if isinstance(t, torch.nn.Parameter) else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class CausalProbe:
    """What one causal localization measures during a pipeline call.

    `clean`: the adapter's `encode_text` of the clean prompts of the call's images;
    `block_batch`: blocks per patch forward (None: as many as keep the variant batch
    within `PATCH_ROWS` rows, or the pipeline's own transformer batch if larger).
    `records`: (block index, step) -> scores [n] on the model's device.
    """

    def __init__(self, adapter, session: Session, method: str, clean: dict, block_batch: int | None = None,
                 alpha: torch.Tensor | None = None, base: torch.Tensor | None = None, objective=None,
                 steps=None):
        if method not in CAUSAL_METHODS:
            raise ValueError(f"not a causal method: {method!r}")
        self.adapter = adapter
        self.session = session
        self.method = method
        self.clean = clean
        self.block_batch = block_batch
        #: for tests (finite differences): evaluate m(alpha) [blocks] instead of its gradient
        self.alpha = alpha
        #: attribution *at a set* (conditional attribution): [blocks, n] gates the
        #: gradient is taken at (1: the image's block reads the clean conditioning, as the call's own
        #: swap withholds it; 0: the prompt's); None: at 0, the plain trajectory's attribution
        self.base = base
        #: attribution of another objective than m: ``objective(pred, x_t, timestep) -> [n]`` on the
        #: conditional rows (e.g. an evaluator's presence in the predicted clean image); the
        #: score is its derivative's negative (what lowers it ranks first)
        self.objective = objective
        #: the steps (transformer forward indices) to measure at; None: every step
        self.steps = None if steps is None else frozenset(steps)
        self.records: dict[tuple[int, int], torch.Tensor] = {}

    @contextmanager
    def installed(self):
        handle = self.adapter.transformer.register_forward_hook(self._after_forward, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def stacked(self, n_blocks: int, n_steps: int) -> torch.Tensor:
        """Scores [blocks, steps, n] on the CPU (the steps measured, where `steps` says)."""
        wanted = range(n_steps) if self.steps is None else sorted(t for t in self.steps if t < n_steps)
        missing = [(b, t) for b in range(n_blocks) for t in wanted if (b, t) not in self.records]
        if missing:
            raise RuntimeError(f"no causal score for (block, step) {missing[0]}")
        return torch.stack([torch.stack([self.records[(b, t)] for t in wanted]) for b in range(n_blocks)]).cpu()

    # ---- the extra forwards ------------------------------------------------------------
    @contextmanager
    def _nested(self, swap, context: ForwardContext):
        session = self.session
        outer, outer_swap = session.context, session.swap  # the call's own swap (a set withheld), if any
        session.swap, session.nested = swap, context
        try:
            yield
        finally:
            session.swap, session.nested, session.context = outer_swap, None, outer

    def _after_forward(self, module, args, kwargs, output):
        session = self.session
        ctx = session.context
        if session.nested is not None or ctx is None or not ctx.active or not ctx.measured:
            return None  # our own forward, a separate negative-prompt forward, or a guidance pass
        if self.steps is not None and ctx.step not in self.steps:
            return None
        adapter = self.adapter
        hidden = args[0] if args else kwargs["hidden_states"]
        n = session.n_images
        rows = adapter.cond_rows(hidden.shape[0], n)
        full = adapter.prediction(output, hidden)[rows].detach().flatten(1).float()  # [n, E]
        names = adapter.block_names()
        c_args, c_kwargs = adapter.cond_inputs(args, kwargs, rows)
        text = kwargs.get("encoder_hidden_states")
        n_text = int(text.shape[1]) if torch.is_tensor(text) and text.ndim == 3 else 0
        step = ctx.step
        if self.objective is not None:
            return self._objective_gradient(args, kwargs, hidden, rows, n, n_text, step)

        # the clean pass: ε_clean, and what every block reads there
        swap = adapter.make_swap(frozenset(names), self.clean, False)
        swap.capturing = True
        with torch.no_grad(), self._nested(swap, ForwardContext(step=step, rows=slice(0, n), n_text=n_text)):
            out = adapter.transformer(*c_args, **adapter.with_text(c_kwargs, self.clean))
        swap.capturing = False
        clean = adapter.prediction(out, hidden).flatten(1).float()
        d = full - clean  # [n, E]
        den = (d * d).sum(1)
        inv = torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))  # [n]

        if self.method == "patch":
            group = self.block_batch or max(1, max(hidden.shape[0], PATCH_ROWS) // n)
            for start in range(0, len(names), group):
                chosen = list(range(start, min(start + group, len(names))))
                g = len(chosen)
                v_args, v_kwargs = adapter.cond_inputs(args, kwargs, rows, g)
                swap.blocks = frozenset(names[b] for b in chosen)
                swap.row_slices = {names[b]: slice(i * n, (i + 1) * n) for i, b in enumerate(chosen)}
                with torch.no_grad(), self._nested(swap, ForwardContext(step=step, rows=slice(0, g * n), n_text=n_text)):
                    out = adapter.transformer(*v_args, **v_kwargs)
                eps = adapter.prediction(out, hidden).flatten(1).float().view(g, n, -1)  # [g, n, E]
                effect = ((full.unsqueeze(0) - eps) * d).sum(-1) * inv  # [g, n]
                for i, b in enumerate(chosen):
                    self.records[(b, step)] = effect[i]
            return None

        # attribution: all blocks from one backward pass (or m at a given alpha, for tests)
        fixed = self.alpha is not None
        alpha = torch.zeros(len(names), n, device=full.device, dtype=torch.float32)
        if fixed:
            alpha = alpha + self.alpha.to(alpha.device, torch.float32).view(-1, 1)
        alpha.requires_grad_(not fixed)
        with torch.set_grad_enabled(not fixed), forward_weights(), self._nested(swap, ForwardContext(
                step=step, rows=slice(0, n), n_text=n_text)):
            gates = alpha if self.base is None else alpha + self.base.to(alpha.device, torch.float32)  # [blocks, n]
            swap.alpha = {name: gates[i] for i, name in enumerate(names)}  # views recorded by autograd
            out = adapter.transformer(*c_args, **c_kwargs)
            pred = adapter.prediction(out, hidden).flatten(1).float()  # ε(α) [n, E]
            if fixed:
                metric = ((full - pred) * d).sum(-1) * inv  # m(α) [n]
                for b in range(len(names)):
                    self.records[(b, step)] = metric
                return None
            objective = ((pred * d).sum(-1) * inv).sum()
            (grad,) = torch.autograd.grad(objective, alpha)
        for b in range(len(names)):
            self.records[(b, step)] = -grad[b].detach()  # ∂m/∂α_b [n]
        return None

    def _objective_gradient(self, args, kwargs, hidden, rows, n, n_text, step):
        """-∂objective/∂α_b at the gates `base` for every block, from one differentiable
        forward of the conditional rows (the blocks read their clean conditioning through
        `text_kv`, kept in a clean pass that stops at the last block)."""
        adapter = self.adapter
        names = adapter.block_names()
        c_args, c_kwargs = adapter.cond_inputs(args, kwargs, rows)
        swap = adapter.make_swap(frozenset(names), self.clean, False)
        swap.capturing = True
        with torch.no_grad(), self._nested(swap, ForwardContext(step=step, rows=slice(0, n), n_text=n_text)):
            adapter.transformer(*c_args, **adapter.with_text(c_kwargs, self.clean))
        swap.capturing = False
        alpha = torch.zeros(len(names), n, device=hidden.device, dtype=torch.float32, requires_grad=True)
        timestep = kwargs.get("timestep")
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == hidden.shape[0]:
            timestep = timestep[rows]
        with torch.enable_grad(), forward_weights(), self._nested(swap, ForwardContext(step=step, rows=slice(0, n),
                                                                                       n_text=n_text)):
            gates = alpha if self.base is None else alpha + self.base.to(alpha.device, torch.float32)  # [blocks, n]
            swap.alpha = {name: gates[i] for i, name in enumerate(names)}
            out = adapter.transformer(*c_args, **c_kwargs)
            value = self.objective(adapter.prediction(out, hidden), hidden[rows], timestep)  # [n]
            (grad,) = torch.autograd.grad(value.float().sum(), alpha)
        for b in range(len(names)):
            self.records[(b, step)] = -grad[b].detach()
        return None
