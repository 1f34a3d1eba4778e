"""Device- and dtype-agnostic: a bfloat16 pipeline localizes and intervenes; the
measurement itself runs in float32 and agrees with the float32 model's ranking inputs."""

import functools
import numpy as np
import torch

import ditloc
from ditloc.testing import tiny_pixart_pipeline, tiny_sana_pipeline

from conftest import RUN

localize_contribution = functools.partial(ditloc.localize, method="contribution")


def test_bfloat16_pipeline():
    pipe = tiny_pixart_pipeline().to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    loc = localize_contribution(pipe, ["a photo of van gogh"], "van gogh", **RUN)
    assert loc.per_sample_step.dtype == torch.float32 and torch.isfinite(loc.per_sample_step).all()
    assert loc.settings["model"]["dtype"] == "bfloat16"
    ref = tiny_pixart_pipeline()
    ref.set_progress_bar_config(disable=True)
    ref_loc = localize_contribution(ref, ["a photo of van gogh"], "van gogh", **RUN)
    # same weights rounded to bf16: step-0 scores agree to bf16 precision
    torch.testing.assert_close(loc.per_sample_step[:, 0], ref_loc.per_sample_step[:, 0], rtol=0.05, atol=0)
    base = ditloc.generate(pipe, ["a photo of van gogh"], output_type="np", **RUN)
    none = ditloc.generate(pipe, ["a photo of van gogh"], withhold=[], concept="van gogh", output_type="np", **RUN)
    assert np.array_equal(base, none)


def test_self_judge_on_a_bfloat16_sana_pipeline():
    """SANA's pipeline keeps its latents in float32 and casts them to the transformer's dtype
    per forward; the model's own judge (the default presence objective) does the same. The
    judge scales the unedited images' mean to 1 and the clean prompt's to 0, and withholding
    every block gives the clean prompt's images, so those two means are 1 and 0 up to
    float64 rounding of O(1) numbers."""
    pipe = tiny_sana_pipeline().to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    result = ditloc.presence(pipe, ["a photo of van gogh in the city", "van gogh painting of a dog"], "van gogh",
                             sets=["all"], objective="self", seed=[0, 1], **RUN)
    assert np.isfinite(result.per_image).all()
    assert abs(result.baseline - 1) < 1e-12 and abs(result.mean[1]) < 1e-12
