import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from diffusers.utils import logging as dlogging  # noqa: E402

dlogging.set_verbosity_error()

from ditloc.testing import tiny_pixart_pipeline, tiny_sana_pipeline  # noqa: E402

# Small sampling settings shared by the tests: 32x32 images, 3 steps.
RUN = dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pixart():
    return _quiet(tiny_pixart_pipeline())


@pytest.fixture(scope="session")
def sana():
    return _quiet(tiny_sana_pipeline())


@pytest.fixture(scope="session")
def sana_qk():
    return _quiet(tiny_sana_pipeline(qk_norm="rms_norm_across_heads"))


@pytest.fixture(params=["pixart", "sana", "sana_qk"])
def any_pipe(request):
    return request.getfixturevalue(request.param)


def plain(pipe, prompt, seed=0, **kw):
    """What a user gets from diffusers alone."""
    args = {**RUN, **kw}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **args).images
