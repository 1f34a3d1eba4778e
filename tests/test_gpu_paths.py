"""The accelerator paths, tested on the CPU where they can be:

- kernel selection: the normalizer comes from the kernel PyTorch picks, called as
  F.scaled_dot_product_attention calls it (CPU flash for real; the CUDA kernels'
  argument handling and output shapes through emulations), and a kernel whose
  normalizer or bits are wrong is caught once and not used;
- no host-device synchronisation from ditloc in the per-block or per-step path:
  the number of host reads of tensor values during a call does not grow with
  the number of steps;
- the joint-attention clean pass stops after the last withheld block, with the
  same images.
"""

from __future__ import annotations

import functools
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, RUN, f32_rtol
from test_contribution import naive, naive_rtol


def lse_tol(q, k):
    """`f32_rtol` of a float32 logsumexp against float64: the logits (d terms), then the sum over the keys."""
    return f32_rtol(q.shape[-1], k.shape[-2])

# the tiny joint-attention pipelines and their settings, shared with the joint tests
from test_joint import FLUX_RUN, PROMPTS, SD3_RUN, flux, sd3  # noqa: F401  (flux, sd3: fixtures)
from torch.overrides import TorchFunctionMode

import ditloc
from ditloc.adapters import get_adapter
from ditloc.engine import (
    chunk_elements_for,
    concept_contribution,
    kernels,
    sdpa_with_lse,
)

localize_contribution = functools.partial(ditloc.localize, method="contribution")


def _qkv(n=2, H=3, N=37, L=13, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, H, s, d, generator=g).to(dtype) for s in (N, L, L))


def _text_mask(n, H, L, lengths, dtype=torch.float32):
    mask = torch.zeros(n, H, 1, L)
    for i, length in enumerate(lengths):
        mask[i, ..., length:] = -10000.0
    return mask.to(dtype)


def _exact_lse(q, k, mask=None):
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask.double()
    return logits.logsumexp(-1)


# ---- kernel selection ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_kernel_output_bits_and_normalizer(dtype, masked):
    q, k, v = _qkv(dtype=dtype)
    mask = _text_mask(2, 3, 13, [9, 13], dtype) if masked else None
    with torch.no_grad():
        out, lse = sdpa_with_lse(q, k, v, mask)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert lse is not None and lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    tol = lse_tol(q, k) if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double(), _exact_lse(q, k, mask), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_on_the_test_device(dtype, masked):
    """On the test device (DITLOC_TEST_DEVICE; benchmarks/gpu_check.sh sets cuda): the output
    has F.sdpa's bits and a fused kernel's normalizer is exact; on CUDA in half precision one
    of the fused kernels must apply (flash without a mask, memory-efficient with one)."""
    device = torch.device(DEVICE)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # the CPU flash kernel's half type here
    q, k, v = (x.to(device) for x in _qkv(n=2, H=4, N=256, L=77, d=64, dtype=dtype))
    mask = _text_mask(2, 4, 77, [20, 77], dtype).to(device) if masked else None
    with torch.no_grad():
        out, lse = sdpa_with_lse(q, k, v, mask)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, want)
    if q.is_cuda and dtype != torch.float32:
        assert lse is not None, kernels.backend_choice(q, k, v, mask)
    if lse is not None:
        tol = lse_tol(q, k) if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(lse.double().cpu(), _exact_lse(q, k, mask).cpu(), rtol=tol, atol=tol)


def test_no_normalizer_when_gradients_flow():
    q, k, v = _qkv()
    q.requires_grad_(True)
    out, lse = sdpa_with_lse(q, k, v)
    assert lse is None and out.requires_grad


def test_masked_normalizer_feeds_the_measurement():
    """Cross attention with a padding mask: the kernel's normalizer gives the naive maps."""
    q, k, v = _qkv(N=21, L=13, d=8, seed=3)
    w = torch.randn(12, 3 * 8, generator=torch.Generator().manual_seed(4))
    mask = _text_mask(2, 3, 13, [9, 13])
    pos, valid = torch.tensor([[1, 4], [7, 7]]), torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        _, lse = sdpa_with_lse(q, k, v, mask)
    got_t, got_h = concept_contribution(q, k, v, pos, valid, mask=mask, out_weight=w, lse=lse, max_position=7)
    want_t, want_h = naive(q, k, v, [[1, 4], [7]], mask, w, None, "attn_value_out")
    tol = naive_rtol(q, k, w, [[1, 4], [7]])
    torch.testing.assert_close(got_t.double(), want_t, rtol=tol, atol=1e-9)
    torch.testing.assert_close(got_h.double(), want_h, rtol=tol, atol=1e-9)


def _fake_query(is_cuda: bool):
    return types.SimpleNamespace(device=torch.device("meta"), is_cuda=is_cuda)


def test_kernel_table():
    cpu = torch.zeros(1, 1, 1, 1)
    assert kernels.kernel_for(cpu, kernels.FLASH)[0] == "flash_cpu"
    assert kernels.kernel_for(cpu, 0) is None  # math fallback: recompute
    assert kernels.kernel_for(cpu, None) is None
    gpu = _fake_query(True)
    assert kernels.kernel_for(gpu, kernels.FLASH)[0] == "flash"
    assert kernels.kernel_for(gpu, kernels.EFFICIENT)[0] == "efficient"
    assert kernels.kernel_for(gpu, kernels.CUDNN)[0] == "cudnn"
    assert kernels.kernel_for(gpu, 0) is None
    assert kernels.kernel_for(_fake_query(False), kernels.FLASH) is None  # another accelerator: public path


class EmulatedOps:
    """The CUDA attention operators' signatures and output layouts, computed on the CPU
    (the efficient kernel pads lse's query dim to a multiple of 32; cuDNN returns
    [B, H, Sq, 1]). Records the arguments it was called with."""

    def __init__(self):
        self.calls = []

    def _attend(self, q, k, v, mask, scale=None):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            logits = logits + mask.float()
        lse = logits.logsumexp(-1)
        return (logits.softmax(-1) @ v.float()).to(q.dtype), lse

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout, causal, debug, scale=None):
        self.calls.append(("flash", q.shape, scale))
        out, lse = self._attend(q, k, v, None, scale)
        return out, lse, None, None, 0, 0, None, None, None

    def _scaled_dot_product_efficient_attention(self, q, k, v, bias, compute_lse, dropout, causal, scale=None):
        self.calls.append(("efficient", bias, compute_lse))
        out, lse = self._attend(q, k, v, bias, scale)
        padded = torch.full((*lse.shape[:2], -(-lse.shape[2] // 32) * 32), float("inf"))
        padded[..., : lse.shape[2]] = lse
        return out, padded, None, None

    def _scaled_dot_product_cudnn_attention(self, q, k, v, bias, compute_lse, dropout, causal, debug, scale=None):
        self.calls.append(("cudnn", bias, compute_lse))
        out, lse = self._attend(q, k, v, bias, scale)
        return out, lse.unsqueeze(-1), None, None, 0, 0, None, None, None


def test_flash_pads_head_dim_and_keeps_the_original_scale(monkeypatch):
    ops = EmulatedOps()
    monkeypatch.setattr(kernels, "ops", ops)
    q, k, v = _qkv(d=12)
    out, lse = kernels._flash(q, k, v, None)
    (name, shape, scale), = ops.calls
    assert shape[-1] == 16 and scale == 1.0 / math.sqrt(12)  # padded to 8s, scaled as d = 12
    assert out.shape == q.shape and lse.shape == (2, 3, 37)
    # the weights' rounding (lse_tol) on a weighted average of the values: within lse_tol * max |v|
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=lse_tol(q, k),
                               atol=lse_tol(q, k) * float(v.abs().max()))
    torch.testing.assert_close(lse.double(), _exact_lse(q, k), rtol=lse_tol(q, k), atol=lse_tol(q, k))


@pytest.mark.parametrize("L", [13, 32])  # unaligned (padded) and aligned key lengths
def test_efficient_mask_and_normalizer_layout(monkeypatch, L):
    ops = EmulatedOps()
    monkeypatch.setattr(kernels, "ops", ops)
    q, k, v = _qkv(L=L)
    mask = _text_mask(2, 3, L, [9, L])
    out, lse = kernels._efficient(q, k, v, mask)
    (_, bias, compute_lse), = ops.calls
    assert compute_lse is True
    assert bias.shape == (2, 3, 37, L) and torch.equal(bias, mask.expand(2, 3, 37, L))
    assert bias.stride(-1) == 1 and all(s % 16 == 0 for s in bias.stride()[:-1])  # the kernel's alignment
    assert lse.shape == (2, 3, 37)
    torch.testing.assert_close(lse.double(), _exact_lse(q, k, mask), rtol=lse_tol(q, k), atol=lse_tol(q, k))


def test_cudnn_normalizer_layout(monkeypatch):
    monkeypatch.setattr(kernels, "ops", EmulatedOps())
    q, k, v = _qkv()
    mask = _text_mask(2, 3, 13, [9, 13])
    out, lse = kernels._cudnn(q, k, v, mask)
    assert lse.shape == (2, 3, 37)
    torch.testing.assert_close(lse.double(), _exact_lse(q, k, mask), rtol=lse_tol(q, k), atol=lse_tol(q, k))


def test_a_wrong_normalizer_is_caught_once_and_not_used(monkeypatch):
    """A private kernel whose normalizer is in another base (say log2) fails the one-time
    check: one warning, then the public function and the recomputed normalizer."""
    calls = []

    def log2_kernel(q, k, v, mask):
        calls.append(1)
        out, lse = kernels._flash_cpu(q, k, v, mask)
        return out, lse / math.log(2)

    monkeypatch.setattr(kernels, "_TRUSTED", {})
    monkeypatch.setattr(kernels, "kernel_for", lambda query, choice: ("flash_cpu", log2_kernel))
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="normalizer off"), torch.no_grad():
        out, lse = sdpa_with_lse(q, k, v)
    assert lse is None and torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    n = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert sdpa_with_lse(q, k, v)[1] is None  # no second check, no second warning
    assert len(calls) == n


def test_a_kernel_with_other_output_bits_is_not_used(monkeypatch):
    """Where F.sdpa runs the same kernel, its output bits must match (the invariants are exact)."""

    def nudged(q, k, v, mask):
        out, lse = kernels._flash_cpu(q, k, v, mask)
        return out + 1e-6, lse

    monkeypatch.setattr(kernels, "_TRUSTED", {})
    monkeypatch.setattr(kernels, "kernel_for",
                        lambda query, choice: ("flash_cpu", nudged) if query.device.type == "cpu" else None)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="differs"), torch.no_grad():
        out, lse = sdpa_with_lse(q, k, v)
    assert lse is None and torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_chunk_bound_per_device():
    assert chunk_elements_for(torch.device("cpu")) == ditloc.engine.CHUNK_ELEMENTS
    meta = chunk_elements_for(torch.device("meta"))  # no memory to ask: a fixed accelerator default
    assert ditloc.engine.CHUNK_ELEMENTS <= meta <= 1 << 28


# ---- host synchronisation --------------------------------------------------------------
SRC = str(Path(ditloc.__file__).resolve().parent)
#: tensor methods that make the host wait for the device (on an accelerator)
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
           "masked_select", "unique", "equal", "allclose", "__repr__", "__format__"}


class HostReads(TorchFunctionMode):
    """Counts the syncing tensor operations called directly from ditloc's code."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        frame = sys._getframe(1)
        if frame.f_code.co_filename.startswith(SRC):
            syncing = name in SYNCING or (name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1])
                                          and args[1].dtype == torch.bool)
            if syncing:
                self.sites.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {name}")
        return func(*args, **(kwargs or {}))


def _host_reads(fn, steps):
    fn(steps)  # warm-up: one-time kernel checks
    with HostReads() as mode:
        fn(steps)
    return mode.sites


def _runs(pipe, run):
    def localize(steps):
        localize_contribution(pipe, PROMPTS, "van gogh", seed=0, **{**run, "num_inference_steps": steps})

    def withhold(steps):
        names = get_adapter(pipe).block_names()
        ditloc.generate(pipe, PROMPTS, withhold=names[:2], concept="van gogh", output_type="latent",
                        **{**run, "num_inference_steps": steps})

    def causal(method):
        def run_it(steps):
            ditloc.localize(pipe, PROMPTS, "van gogh", seed=0, method=method, **{**run, "num_inference_steps": steps})
        return run_it

    return {"localize": localize, "withhold": withhold, "patch": causal("patch"), "attribution": causal("attribution")}


@pytest.mark.parametrize("family", ["pixart", "sana", "flux", "sd3"])
@pytest.mark.parametrize("what", ["localize", "withhold", "patch", "attribution"])
def test_host_reads_do_not_grow_with_steps(request, family, what):
    """ditloc reads device values on the host only a fixed number of times per call
    (collecting the records at its end, the text key limit once), never per block or
    per step: a run with twice the steps makes exactly as many reads."""
    pipe = request.getfixturevalue(family)
    run = {"pixart": RUN, "sana": RUN, "flux": FLUX_RUN, "sd3": SD3_RUN}[family]
    fn = _runs(pipe, run)[what]
    few, many = _host_reads(fn, 2), _host_reads(fn, 4)
    assert len(few) == len(many), (few, many)
    assert len(few) <= 4, few


# ---- joint attention: the clean pass stops after the last withheld block ----------------
def _count_block_calls(pipe):
    adapter = get_adapter(pipe)
    counts = {name: 0 for name in adapter.block_names()}
    handles = []
    for name in counts:
        def hook(module, args, name=name):
            counts[name] += 1
        handles.append(adapter.block_module(name).register_forward_pre_hook(hook))
    return counts, handles


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_clean_pass_stops_after_the_last_withheld_block(request, family, monkeypatch):
    pipe = request.getfixturevalue(family)
    run = FLUX_RUN if family == "flux" else SD3_RUN
    names = get_adapter(pipe).block_names()
    withheld = [names[0]]
    counts, handles = _count_block_calls(pipe)
    try:
        short = ditloc.generate(pipe, PROMPTS, withhold=withheld, concept="van gogh", output_type="np", **run)
    finally:
        for h in handles:
            h.remove()
    steps = run["num_inference_steps"]
    assert counts[names[0]] == 2 * steps  # the real pass and the clean pass
    assert all(counts[n] == steps for n in names[1:])  # the real pass only
    # the same images as a clean pass run to the end
    from ditloc.adapters.joint_attention import JointAttentionAdapter

    monkeypatch.setattr(JointAttentionAdapter, "_last_withheld", lambda self, blocks, kwargs: None)
    whole = ditloc.generate(pipe, PROMPTS, withhold=withheld, concept="van gogh", output_type="np", **run)
    assert np.array_equal(short, whole)


def test_clean_pass_runs_whole_under_a_lora_scale(flux):
    adapter = get_adapter(flux)
    names = adapter.block_names()
    chosen = frozenset([names[0], names[2]])
    assert adapter._last_withheld(chosen, {}) == names[2]
    assert adapter._last_withheld(chosen, {"joint_attention_kwargs": {"scale": 1.0}}) == names[2]
    assert adapter._last_withheld(chosen, {"joint_attention_kwargs": {"scale": 0.5}}) is None


def test_no_caption_cleaning_warning_when_the_caller_chose(pixart, monkeypatch):
    """The bs4/ftfy warning is for a default the caller did not choose; passing
    clean_caption explicitly silences it (the benchmark and CLI pass it)."""
    from ditloc.adapters import cross_attention

    monkeypatch.setattr(cross_attention, "_caption_cleaning_available", lambda: False)
    adapter = get_adapter(pixart)
    with pytest.warns(UserWarning, match="caption-cleaned"):
        adapter.default_call_kwargs({})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "clean_caption" not in adapter.default_call_kwargs({"clean_caption": False})
