"""ditloc under diffusers' offloading, on tiny float64 pipelines of every family: with
`enable_model_cpu_offload`, group offloading at block and leaf level (in memory) and
block-level group offloading to disk, localization, withholding, the set search and
closed-form unlearning give exactly the numbers of the same pipeline without offloading;
the offloading hooks stay installed; edits that cannot reach the weights are refused first.

Offloading to disk leaves an offloaded group's tensors empty between forwards; here they
are filled with NaN (`poisoned_disk`), so any weight ditloc read outside the forward that
loads it would show in the numbers. Its weights come back from files into other memory,
where CPU kernels may round differently: that mode is compared at PyTorch's default
tolerances for the dtype (a few units of float32 rounding), the others exactly. The onload
device is DITLOC_TEST_DEVICE (conftest), so on an accelerator the weights really live on
another device between forwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks import apply_group_offloading
from diffusers.hooks.group_offloading import ModuleGroup

import ditloc
from conftest import DEVICE
from ditloc import DitlocError, SearchConfig
from ditloc.edit import ClosedFormConfig, unlearn
from ditloc.offload import check_readable, offloading
from ditloc.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

PROMPTS = ["a photo of van gogh in the city", "van gogh painting of a dog"]
CONCEPT = "van gogh"
CASES = {
    "pixart": (tiny_pixart_pipeline, dict(num_inference_steps=2, height=32, width=32, use_resolution_binning=False)),
    "sana": (tiny_sana_pipeline, dict(num_inference_steps=2, height=32, width=32, use_resolution_binning=False)),
    "flux": (tiny_flux_pipeline, dict(num_inference_steps=2, height=16, width=16, max_sequence_length=32)),
    "sd3": (tiny_sd3_pipeline, dict(num_inference_steps=2, height=8, width=8, max_sequence_length=32)),
}
MODES = ("model", "block", "leaf", "disk")
ONLOAD = torch.device(DEVICE)


@pytest.fixture
def poisoned_disk(monkeypatch):
    """Group offloading to disk whose offloaded tensors read NaN (not whatever memory
    `torch.empty_like` returns): a weight read outside its forward poisons the result."""
    offload = ModuleGroup._offload_to_disk

    def poisoned(self):
        offload(self)
        for t in self.tensor_to_key:
            if t.is_floating_point():
                t.data.fill_(float("nan"))

    monkeypatch.setattr(ModuleGroup, "_offload_to_disk", poisoned)


def _plain(family):
    pipe = CASES[family][0]().to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(ONLOAD)


def _offloaded(family, mode, tmp_path):
    pipe = CASES[family][0]().to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    if mode == "model":
        pipe.enable_model_cpu_offload(device=ONLOAD)
    elif mode == "block":
        pipe.enable_group_offload(onload_device=ONLOAD, offload_type="block_level", num_blocks_per_group=1)
    elif mode == "leaf":
        pipe.enable_group_offload(onload_device=ONLOAD, offload_type="leaf_level")
    else:  # the transformer only: components of one class would share disk files
        pipe.to(ONLOAD)
        apply_group_offloading(pipe.transformer, onload_device=ONLOAD, offload_type="block_level",
                               num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / "offload"))
    assert offloading(pipe.transformer).kind == ("model" if mode == "model" else "group")
    return pipe


def _same(got, want, mode):
    """Exactly equal; after a disk round trip, equal up to a few units of float32 rounding."""
    got, want = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(want))
    if mode == "disk":
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)


def _hooks(pipe):
    """The transformer's offloading hooks (diffusers' by identity; accelerate's by type: the
    pipeline re-creates them after every call) and its attention processors (by identity)."""
    t = pipe.transformer

    def registered(m):
        registry = getattr(m, "_diffusers_hook", None)
        return tuple((k, id(h)) for k, h in registry.hooks.items()) if registry is not None else ()

    hooks = [(n, type(getattr(m, "_hf_hook", None)).__name__, registered(m)) for n, m in t.named_modules()]
    return hooks, {k: id(v) for k, v in t.attn_processors.items()}


_REFERENCE = {}


def _reference(family):
    """Contribution scores and withheld generations of the un-offloaded pipeline (once per family)."""
    if family not in _REFERENCE:
        pipe, run = _plain(family), CASES[family][1]
        names = ditloc.get_adapter(pipe).block_names()
        loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="contribution", seed=[0, 1], **run)
        withheld = ditloc.generate(pipe, PROMPTS, withhold=[names[0], names[-1]], concept=CONCEPT, seed=[0, 1],
                                   output_type="latent", **run)
        _REFERENCE[family] = loc, withheld
    return _REFERENCE[family]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(CASES))
def test_localize_and_withhold_match_unoffloaded(family, mode, tmp_path, poisoned_disk):
    ref_loc, ref_withheld = _reference(family)
    pipe, run = _offloaded(family, mode, tmp_path), CASES[family][1]
    before = _hooks(pipe)
    names = ditloc.get_adapter(pipe).block_names()
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="contribution", seed=[0, 1], **run)
    _same(loc.per_sample_step, ref_loc.per_sample_step, mode)
    _same(loc.per_head_step, ref_loc.per_head_step, mode)
    withheld = ditloc.generate(pipe, PROMPTS, withhold=[names[0], names[-1]], concept=CONCEPT, seed=[0, 1],
                               output_type="latent", **run)
    _same(withheld, ref_withheld, mode)
    assert _hooks(pipe) == before  # ditloc removed what it added, and only that
    assert loc.settings["model"]["device"] == str(pipe._execution_device)


@pytest.mark.parametrize("family, mode", [("pixart", "model"), ("sana", "block"), ("flux", "leaf"),
                                          ("sd3", "disk")])
def test_search_and_presence_match_unoffloaded(family, mode, tmp_path, poisoned_disk):
    """The gradient-ranked search (extra forwards and a backward after each measured
    forward, the model judging itself), the causal block methods (attribution: a backward
    pass through offloaded blocks) and presence under several block sets per call."""
    run = CASES[family][1]
    config = SearchConfig(max_k=2, objective="self", rank="gradient", verify=1, gradient_steps=1, search_steps=None)
    results = []
    for pipe in (_plain(family), _offloaded(family, mode, tmp_path)):
        names = ditloc.get_adapter(pipe).block_names()
        sets = [[names[0]], names[:2], "all"]
        search = ditloc.localize(pipe, PROMPTS[:1], CONCEPT, method="search", search=config, **run)
        patch = ditloc.localize(pipe, PROMPTS[:1], CONCEPT, method="patch", **run)
        attribution = ditloc.localize(pipe, PROMPTS[:1], CONCEPT, method="attribution", **run)
        presence = ditloc.presence(pipe, PROMPTS[:1], CONCEPT, sets=sets, objective="self", seed=[0, 1], **run)
        results.append((search, patch, attribution, presence))
    (s0, p0, a0, r0), (s1, p1, a1, r1) = results
    assert s1.search.sets == s0.search.sets
    _same(s1.search.presence, s0.search.presence, mode)
    _same(p1.per_sample_step, p0.per_sample_step, mode)
    _same(a1.per_sample_step, a0.per_sample_step, mode)
    _same(r1.per_image, r0.per_image, mode)


def _unlearn(pipe, family, tmp_path, **extra):
    names = ditloc.get_adapter(pipe).block_names()
    config = ClosedFormConfig(timesteps=2, export_lora=False, pooled=family in ("flux", "sd3"))
    return unlearn(pipe, "dog", "cat", prompts=["a red dog on the beach", "a photo of a dog"],
                   preserve=["a red cat on the beach", "a photo of a car"], blocks=",".join(names[:2]), config=config,
                   out=tmp_path, **{**CASES[family][1], **extra})


def _state(pipe):
    return {k: v.detach().cpu().clone() for k, v in pipe.transformer.state_dict().items()}


@pytest.mark.parametrize("mode", ("model", "block", "leaf"))
@pytest.mark.parametrize("family", list(CASES))
def test_closed_form_edit_matches_unoffloaded(family, mode, tmp_path):
    """The edit writes the same weights where the offloader restores them from: the state
    after the edit, and a generation after it (the offloader loads the edited weights)."""
    ref, pipe = _plain(family), _offloaded(family, mode, tmp_path)
    before, hooks = _state(pipe), _hooks(pipe)
    want = _unlearn(ref, family, tmp_path / "ref")
    got = _unlearn(pipe, family, tmp_path / "off")
    assert got.blocks == want.blocks and got.details["fit"] == want.details["fit"]
    edited, expected = _state(pipe), _state(ref)
    assert set(edited) == set(expected) and all(torch.equal(edited[k], expected[k]) for k in expected)
    assert any(not torch.equal(edited[k], before[k]) for k in before)  # the edit changed weights
    assert _hooks(pipe) == hooks
    run = CASES[family][1]
    after = ditloc.generate(pipe, PROMPTS, seed=[0, 1], output_type="latent", **run)
    assert torch.equal(after, ditloc.generate(ref, PROMPTS, seed=[0, 1], output_type="latent", **run))


def test_automatic_k_restores_and_writes_through_offloading(tmp_path):
    """`k="gap"` writes each K's edit, measures it and restores the weights before keeping the best K."""
    family = "pixart"
    ref, pipe = _plain(family), _offloaded(family, "leaf", tmp_path)
    results = []
    for p, out in ((ref, "ref"), (pipe, "off")):
        results.append(unlearn(p, "dog", "cat", prompts=["a red dog on the beach", "a photo of a dog"],
                               blocks="auto", k="gap", config=ClosedFormConfig(export_lora=False),
                               localize_method="contribution", out=tmp_path / out, **CASES[family][1]))
    assert results[1].blocks == results[0].blocks
    assert results[1].details["k_gaps"] == results[0].details["k_gaps"]
    edited, expected = _state(pipe), _state(ref)
    assert all(torch.equal(edited[k], expected[k]) for k in expected)


def test_edits_refused_where_offloading_keeps_weights_on_disk(tmp_path, poisoned_disk):
    pipe = _offloaded("pixart", "disk", tmp_path)
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(DitlocError, match="group offloading to disk"):
        _unlearn(pipe, "pixart", tmp_path / "out")
    assert not forwards  # refused before any work


def test_contribution_refused_under_leaf_level_disk_offloading(tmp_path):
    pipe = CASES["pixart"][0]().to(torch.float64)
    apply_group_offloading(pipe.transformer, onload_device=ONLOAD, offload_type="leaf_level",
                           offload_to_disk_path=str(tmp_path / "offload"))
    with pytest.raises(DitlocError, match="leaf-level group offloading to disk"):
        ditloc.localize(pipe, PROMPTS, CONCEPT, method="contribution", **CASES["pixart"][1])
    check_readable(tiny_pixart_pipeline().transformer)  # nothing offloaded: nothing to refuse
    ditloc.localize(pipe, PROMPTS, CONCEPT, method="contribution", contribution_terms="attn_value", **CASES["pixart"][1])
