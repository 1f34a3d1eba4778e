"""The Localization result: ranking, top-k, JSON round trip, determinism."""

import copy
import functools
import json

import pytest
import torch

import ditloc
from ditloc import DitlocError, Localization

from conftest import RUN, f32_rtol

localize_contribution = functools.partial(ditloc.localize, method="contribution")


@pytest.fixture(scope="module")
def loc(pixart):
    return localize_contribution(pixart, ["a photo of van gogh", "van gogh at night"], "van gogh", seed=[0, 1], **RUN)


def test_shapes_and_aggregates(loc):
    assert loc.blocks == ("block.0", "block.1", "block.2", "block.3")
    assert loc.per_sample_step.shape == (4, 3, 4)  # blocks, steps, prompts x seeds
    assert loc.per_head.shape == (4, 4)
    torch.testing.assert_close(loc.scores, loc.per_step.mean(1))
    torch.testing.assert_close(loc.scores, loc.per_sample.mean(1))
    assert (loc.scores > 0).all()


def test_ranking_and_top(loc):
    order = sorted(range(4), key=lambda i: -loc.scores[i].item())
    assert loc.ranking == [loc.blocks[i] for i in order]
    assert loc.top(2) == loc.ranking[:2]
    for bad in (0, 5, -1):
        with pytest.raises(DitlocError, match="between 1 and 4"):
            loc.top(bad)


def test_json_round_trip(loc, tmp_path):
    path = loc.save(tmp_path / "loc.json")
    d = json.loads(path.read_text())
    assert d["ranking"] == loc.ranking and d["blocks"] == list(loc.blocks)
    assert d["settings"]["seeds"] == [0, 1] and d["settings"]["contribution_terms"] == "attn_value_out"
    assert d["settings"]["guidance_scale"] == 4.5 and d["settings"]["max_sequence_length"] == 120
    assert d["spans"][0]["positions"] == [3, 4]
    back = Localization.load(path)
    torch.testing.assert_close(back.per_sample_step, loc.per_sample_step)
    torch.testing.assert_close(back.per_head_step, loc.per_head_step)
    assert back.ranking == loc.ranking and back.spans == loc.spans


def test_bad_files(tmp_path):
    with pytest.raises(DitlocError, match="does not exist"):
        Localization.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DitlocError, match="cannot read"):
        Localization.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(DitlocError, match="not a ditloc localization"):
        Localization.load(tmp_path / "other.json")


def _across_batches(pipe):
    """(the pipeline in float64, the relative tolerance between two batch layouts). In float64 the trajectories
    agree to float64 rounding; what remains is the contribution kernel, float32 whatever the pipeline's dtype,
    whose chunking of the queries follows the batch: two float32 computations of one value, each within
    `f32_rtol` of it, over the reductions of one attention (head dim, keys and queries at most 300, the
    concept's 2 keys, the projection's inputs and outputs)."""
    attn = ditloc.get_adapter(pipe).text_attention(ditloc.get_adapter(pipe).block_names()[0])
    D, Hd = attn.to_out[0].weight.shape
    return copy.deepcopy(pipe).to(torch.float64), 2 * f32_rtol(Hd // attn.heads, 300, 2, Hd, D, 300)


def test_deterministic(pixart):
    pipe, tol = _across_batches(pixart)
    prompts = ["a photo of van gogh", "van gogh at night"]
    first = localize_contribution(pipe, prompts, "van gogh", seed=[0, 1], **RUN)
    again = localize_contribution(pipe, prompts, "van gogh", seed=[0, 1], batch_size=3, **RUN)
    torch.testing.assert_close(again.per_sample_step, first.per_sample_step, rtol=tol, atol=0)
    assert again.ranking == first.ranking


def test_single_prompt_trajectory_is_the_plain_one(pixart):
    """Batched localization measures each prompt on its own `pipe(prompt, generator=seed)` trajectory."""
    pipe, tol = _across_batches(pixart)
    both = localize_contribution(pipe, ["a photo of van gogh", "van gogh at night"], "van gogh", seed=7, **RUN)
    one = localize_contribution(pipe, ["van gogh at night"], "van gogh", seed=7, **RUN)
    torch.testing.assert_close(both.per_sample_step[:, :, 1], one.per_sample_step[:, :, 0], rtol=tol, atol=0)
    assert (both.per_sample_step[:, :, 1] - both.per_sample_step[:, :, 0]).abs().max() > 1e2 * tol  # can fail
