"""Exact invariants of intervention, for any weights."""

import copy
import numpy as np
import pytest
import torch

import ditloc
from ditloc import DitlocError, derive_clean_prompt

from conftest import RUN, plain

PROMPTS = ["a photo of van gogh in the city", "van gogh painting of a dog"]
CLEAN = ["a photo in the city", "painting of a dog"]


def gen(pipe, prompts=PROMPTS, **kw):
    return ditloc.generate(pipe, prompts, output_type="np", **{**RUN, **kw})


def plain_batch(pipe, prompts, seeds):
    """diffusers alone, same batch: one generator per image."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=gens, output_type="np", **RUN).images


def test_withhold_nothing_is_bit_identical(any_pipe):
    out = gen(any_pipe, withhold=[], concept="van gogh", seed=[0, 1])
    want = plain_batch(any_pipe, [p for p in PROMPTS for _ in (0, 1)], [0, 1, 0, 1])
    assert np.array_equal(out, want)
    one = gen(any_pipe, prompts=PROMPTS[:1], withhold=[], concept="van gogh", seed=1)
    assert np.array_equal(one[0], plain(any_pipe, PROMPTS[0], seed=1)[0])


def test_withhold_everywhere_equals_clean_prompt(any_pipe):
    out = gen(any_pipe, withhold="all", concept="van gogh")
    assert [derive_clean_prompt(p, "van gogh") for p in PROMPTS] == CLEAN
    assert np.array_equal(out, plain_batch(any_pipe, CLEAN, [0, 0]))


def test_inject_everywhere_is_plain(any_pipe):
    out = gen(any_pipe, inject="all", concept="van gogh")
    assert np.array_equal(out, plain_batch(any_pipe, PROMPTS, [0, 0]))


def test_inject_nowhere_equals_clean_prompt(pixart):
    out = gen(pixart, inject=[], clean_prompts=CLEAN, concept="van gogh")
    assert np.array_equal(out, plain_batch(pixart, CLEAN, [0, 0]))


def test_partial_withhold_changes_the_image_and_is_complementary(pixart):
    base = gen(pixart)
    some = gen(pixart, withhold=["block.1", "block.2"], concept="van gogh")
    rest = gen(pixart, inject=["block.0", "block.3"], concept="van gogh")
    assert not np.array_equal(some, base)
    assert np.array_equal(some, rest)  # withholding B == injecting into the complement of B


def test_batching_does_not_change_single_image_trajectories(pixart):
    # float64: the batch size changes only the rounding of the forwards (~1e-16 relative each, grown over
    # 3 steps of 4 blocks: far below 1e-10); in float32 it moves latents by ~1e-6, by CPU vendor
    pipe = copy.deepcopy(pixart).to(torch.float64)
    kw = dict(withhold=["block.1"], concept="van gogh", output_type="latent", **RUN)
    batched = ditloc.generate(pipe, PROMPTS, seed=[3, 4], **kw)
    single = ditloc.generate(pipe, PROMPTS[1:], seed=4, **kw)
    assert batched.dtype == torch.float64
    torch.testing.assert_close(batched[3], single[0], rtol=1e-10, atol=1e-10 * float(single.abs().max()))
    assert (batched[3] - batched[2]).abs().max() > 1e-3  # the seeds differ: the test can fail


def test_explicit_clean_prompt_and_guidance_off(pixart):
    out = gen(pixart, prompts=PROMPTS[:1], withhold="all", clean_prompts=["a photo of a dog"], guidance_scale=1.0)
    assert np.array_equal(out[0], plain(pixart, "a photo of a dog", guidance_scale=1.0)[0])


def test_pil_output(pixart):
    imgs = ditloc.generate(pixart, PROMPTS, withhold=["block.0"], concept="van gogh", **RUN)
    assert len(imgs) == 2 and imgs[0].size == (32, 32)


def test_bad_input(pixart):
    with pytest.raises(DitlocError, match="either withhold or inject"):
        gen(pixart, withhold=[], inject=[], concept="van gogh")
    with pytest.raises(DitlocError, match=r"unknown block 'block\.9'.*block\.0 \.\.\. block\.3"):
        gen(pixart, withhold=["block.9"], concept="van gogh")
    with pytest.raises(DitlocError, match="needs the concept or the clean prompts"):
        gen(pixart, withhold=["block.0"])
    with pytest.raises(DitlocError, match="2 prompts"):
        gen(pixart, withhold=["block.0"], clean_prompts=["x"])
    with pytest.raises(DitlocError, match="not in prompt"):
        gen(pixart, withhold=["block.0"], concept="snoopy")
