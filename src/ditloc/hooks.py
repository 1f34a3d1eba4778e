"""Install ditloc's processors and hooks; restore exactly what was there.

`instrument(adapter, state)` swaps in one processor per block's text attention
and one forward pre-hook on the transformer (it counts denoiser calls and builds
the substitute text conditioning of withheld blocks). On exit, also after an
exception, every processor object is put back and the hook removed: the
pipeline leaves our hands exactly as it came in.
"""

from __future__ import annotations

from contextlib import contextmanager

from .errors import DitlocError
from .processors import RunState


def _is_ours(processor) -> bool:
    return getattr(processor, "__module__", "").startswith("ditloc.") or type(processor).__module__.startswith(
        "ditloc."
    )


@contextmanager
def instrument(adapter, state: RunState):
    blocks = adapter.block_names()
    attns = [adapter.text_attention(b) for b in blocks]
    if any(_is_ours(a.processor) for a in attns):
        raise DitlocError("this pipeline is already instrumented by ditloc; nested runs are not supported")
    originals = [a.processor for a in attns]

    def pre_hook(module, args, kwargs):
        if state.capturing:  # the adapter's own clean-prompt pass
            return None
        return adapter.on_forward(state, args, kwargs)

    handle = None
    try:
        for i, (block, attn) in enumerate(zip(blocks, attns)):
            attn.set_processor(adapter.make_processor(block, i, attn, state))
        handle = adapter.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        yield state
    finally:
        if handle is not None:
            handle.remove()
        for attn, proc in zip(attns, originals):
            attn.set_processor(proc)
        if state.swap is not None:
            state.swap.states = state.swap.mask = None
            state.swap.text_kv = {}
        state.capturing = False
