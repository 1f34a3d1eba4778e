"""Install ditloc's processors and hooks; restore exactly what was there.

`instrument(adapter, session)` swaps in one processor per block's text attention
(the adapter makes them) and one forward pre-hook on the transformer (the
adapter's `on_forward`: it sets the per-forward context and prepares withheld
blocks' substitute text). On exit, also after an exception, every processor
object is put back and the hook removed: the pipeline leaves our hands exactly
as it came in.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import DitlocError
from .state import Session


def _is_ours(processor) -> bool:
    return getattr(processor, "__module__", "").startswith("ditloc.") or type(processor).__module__.startswith(
        "ditloc."
    )


@contextmanager
def instrument(adapter, session: Session):
    blocks = adapter.block_names()
    attns = [adapter.text_attention(b) for b in blocks]
    if any(_is_ours(a.processor) for a in attns):
        raise DitlocError("this pipeline is already instrumented by ditloc; nested runs are not supported")
    originals = [a.processor for a in attns]

    def pre_hook(module, args, kwargs):
        if session.nested is not None:  # ditloc's own extra forward: its context is set by the caller
            session.context = session.nested
            return None
        return adapter.on_forward(session, args, kwargs)

    handle = None
    try:
        for i, (block, attn) in enumerate(zip(blocks, attns)):
            attn.set_processor(adapter.make_processor(block, i, attn, session))
        handle = adapter.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        yield session
    finally:
        if handle is not None:
            handle.remove()
        for attn, proc in zip(attns, originals):
            attn.set_processor(proc)
        session.release()
