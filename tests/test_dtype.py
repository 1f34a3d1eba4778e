"""Device- and dtype-agnostic: a bfloat16 pipeline localizes and intervenes; the
measurement itself runs in float32 and agrees with the float32 model's ranking inputs."""

import functools
import numpy as np
import torch

import ditloc
from ditloc.testing import tiny_pixart_pipeline

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
