import functools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from diffusers.utils import logging as dlogging  # noqa: E402

dlogging.set_verbosity_error()

from diffusers import DiffusionPipeline  # noqa: E402

from ditloc.testing import tiny_pixart_pipeline, tiny_sana_pipeline  # noqa: E402

#: float32 machine epsilon (2^-23): the spacing of float32 numbers in [1, 2)
EPS32 = float(torch.finfo(torch.float32).eps)


def f32_rtol(*lengths, k=8):
    """Relative tolerance for a float32 computation checked against a float64 reference of the same
    formula: a reduction over n float32 terms carries a relative rounding error of about sqrt(n) * eps32
    (the errors of its n additions add as a random walk; n * eps32 is the worst case), the errors of a
    chain of reductions of these lengths add, and k covers the elementwise operations between them (exp,
    division, square root: eps32 / 2 each) and the amplification of an exponent's error by |logit| <= ~4."""
    return k * EPS32 * sum(math.sqrt(n) for n in lengths)


# Small sampling settings shared by the tests: 32x32 images, 3 steps.
RUN = dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False)

#: Where the tiny pipelines run (float32). DITLOC_TEST_DEVICE=cuda (benchmarks/gpu_check.sh) moves every
#: pipeline a fixture returns there, also those the test modules build in their own fixtures; generators
#: stay CPU ones (diffusers draws on the CPU and moves the noise). Default cpu: nothing is moved.
DEVICE = os.environ.get("DITLOC_TEST_DEVICE", "cpu")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


if DEVICE != "cpu":

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(fixturedef, request):
        value = yield
        if isinstance(value, DiffusionPipeline):
            value.to(DEVICE)  # in place: the cached fixture value is this same object
        return value

    @pytest.fixture(autouse=True)
    def _compare_on_cpu():
        """A `Localization` holds CPU tensors; the naive reference maps are computed on the device.
        assert_close compares them on the CPU (its own check_device=False) instead of refusing.
        A private MonkeyPatch: tests that call `monkeypatch.undo()` do not undo this."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.testing, "assert_close",
                       functools.partial(torch.testing.assert_close, check_device=False))
            yield


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
