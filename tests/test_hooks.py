"""Everything installed is undone, also after an exception."""

import functools
import pytest
import torch

import ditloc
from ditloc.adapters import get_adapter
from ditloc.errors import DitlocError
from ditloc.engine import Probe, Session, instrument

from conftest import RUN

localize_contribution = functools.partial(ditloc.localize, method="contribution")


def snapshot(pipe):
    t = pipe.transformer
    procs = dict(t.attn_processors)
    hooks = [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in t.named_modules()]
    return procs, hooks


def assert_same(pipe, before):
    procs, hooks = snapshot(pipe)
    assert procs.keys() == before[0].keys()
    assert all(procs[k] is before[0][k] for k in procs)
    assert [(n, list(a), list(b)) for n, a, b in hooks] == [(n, list(a), list(b)) for n, a, b in before[1]]


def test_restored_after_success(any_pipe):
    before = snapshot(any_pipe)
    localize_contribution(any_pipe, ["a photo of van gogh"], "van gogh", **RUN)
    ditloc.generate(any_pipe, ["a photo of van gogh"], withhold=["block.0"], concept="van gogh", **RUN)
    assert_same(any_pipe, before)


def test_restored_after_exception(pixart):
    before = snapshot(pixart)

    def boom(*args):  # PixArt's pipeline takes the older `callback=` API
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        localize_contribution(pixart, ["a photo of van gogh"], "van gogh", callback=boom, **RUN)
    assert_same(pixart, before)
    with pytest.raises(RuntimeError, match="boom"):
        ditloc.generate(pixart, ["a photo of van gogh"], withhold="all", concept="van gogh", callback=boom, **RUN)
    assert_same(pixart, before)


def test_unknown_pipeline_keyword_is_an_error(pixart):
    with pytest.raises(DitlocError, match="takes no argument 'callback_on_step_end'"):
        localize_contribution(pixart, ["a photo of van gogh"], "van gogh", callback_on_step_end=print, **RUN)
    with pytest.raises(DitlocError, match="ditloc's own argument"):
        ditloc.generate(pixart, ["a photo of van gogh"], output_type="np", **{**RUN, "generator": None})


def test_user_processors_survive(pixart):
    """A processor the user installed (here a torch Module, like IP-adapter's) comes back as is."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class ModuleProcessor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = AttnProcessor2_0()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)

    attn = get_adapter(pixart).text_attention("block.1")
    original = attn.processor
    mine = ModuleProcessor()
    attn.set_processor(mine)
    try:
        ditloc.generate(pixart, ["a photo of van gogh"], withhold=["block.1"], concept="van gogh", **RUN)
        assert attn.processor is mine and "processor" in attn._modules
    finally:
        attn.set_processor(original)


def test_nested_instrumentation_is_refused(pixart):
    adapter = get_adapter(pixart)
    before = snapshot(pixart)
    with instrument(adapter, Session()):
        with pytest.raises(DitlocError, match="already instrumented"):
            localize_contribution(pixart, ["a photo of van gogh"], "van gogh", **RUN)
    assert_same(pixart, before)


def test_measuring_does_not_change_the_trajectory(any_pipe):
    """The probe recomputes attn2 itself (it needs q, k, v): its output must equal the stock processor's."""
    from conftest import plain

    adapter = get_adapter(any_pipe)
    span = adapter.concept_span("a photo of van gogh", "van gogh", {})
    state = Session()
    state.probe = Probe.for_spans([span], terms="attn_value_out", out_bias=False)
    with instrument(adapter, state):
        state.begin_call(1)
        got = any_pipe("a photo of van gogh", generator=torch.Generator().manual_seed(0), output_type="np", **RUN).images
    assert len(state.probe.records) == len(adapter.block_names()) * RUN["num_inference_steps"]
    assert (got == plain(any_pipe, "a photo of van gogh")).all()
