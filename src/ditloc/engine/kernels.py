"""Attention with each row's softmax normalizer, from the kernel PyTorch would run.

`F.scaled_dot_product_attention` picks one backend per call
(`torch._fused_sdp_choice`). The fused ones all compute each query row's
logsumexp over the keys anyway: PyTorch's CPU flash kernel, and on CUDA the
flash, memory-efficient and cuDNN kernels (for their backward pass).
`sdpa_with_lse` calls the kernel PyTorch would pick, the way
`F.scaled_dot_product_attention` calls it (the same padding of head dims and
masks, the same scale), so the output has the same bits, and returns the
normalizer as well. The contribution measurement then touches only the |S|
concept keys (`concept_contribution(..., lse=...)`).

Private entry points can change between PyTorch versions, so each
(kernel, device, dtype, head dim, masked) combination is checked once per
process on a small input: the normalizer against an exact float32 logsumexp, and
the output's bits against `F.scaled_dot_product_attention`'s where that picks
the same kernel. A combination that fails (or raises) is not used again: the
public function runs and the normalizer is recomputed from q·k (correct, slower),
with one warning. The check synchronises with the device once per combination,
never per block or step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend

    FLASH, EFFICIENT, CUDNN = (SDPBackend.FLASH_ATTENTION.value, SDPBackend.EFFICIENT_ATTENTION.value,
                               SDPBackend.CUDNN_ATTENTION.value)
except (ImportError, AttributeError):  # older PyTorch: the C++ enum's values
    FLASH, EFFICIENT, CUDNN = 1, 2, 3

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]

#: the operator namespace the kernels are called through (tests substitute emulations)
ops = torch.ops.aten

#: (kernel name, device type, device index, dtype, head dim, masked) -> usable
_TRUSTED: dict[tuple, bool] = {}


def backend_choice(query, key, value, attn_mask=None) -> int | None:
    """The backend `F.scaled_dot_product_attention` runs for these inputs (an
    `SDPBackend` value), or None where PyTorch cannot say. Host-side only: it reads
    shapes, dtypes, strides and device properties, never tensor values."""
    try:
        return int(torch._fused_sdp_choice(query, key, value, attn_mask, 0.0, False))
    except (AttributeError, RuntimeError, TypeError):
        return None


def _flash_cpu(q, k, v, mask):
    out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)
    return out, lse  # lse [B, H, Sq]


def _flash(q, k, v, mask):
    # F.scaled_dot_product_attention pads the head dim to a multiple of 8, scales by the
    # original 1/sqrt(d) and slices the output back. Flash takes no mask (never chosen with one).
    d = q.shape[-1]
    pad = (-d) % 8
    if pad:
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    res = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=1.0 / math.sqrt(d))
    out, lse = res[0], res[1]
    return (out[..., :d] if pad else out), lse  # lse [B, H, Sq]


def efficient_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The additive mask as F.scaled_dot_product_attention hands it to the
    memory-efficient kernel: expanded to [B, H, Sq, Sk] and, where Sk is not a
    multiple of 16, padded to one and sliced back (aligned storage, same values)."""
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    length = mask.shape[-1]
    if length % 16:
        return F.pad(mask, (0, 16 - length % 16))[..., :length]
    if mask.stride(-1) != 1 or any(s % 16 for s in mask.stride()[:-1]):
        return mask.contiguous()
    return mask


def _efficient(q, k, v, mask):
    if mask is not None:
        mask = efficient_mask(mask, q, k)
    res = ops._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, False)
    out, lse = res[0], res[1]
    return out, lse[..., : q.shape[2]]  # the kernel pads the query dim of lse (to 32 on CUDA)


def _cudnn(q, k, v, mask):
    res = ops._scaled_dot_product_cudnn_attention(q, k, v, mask, True, 0.0, False, False)
    out, lse = res[0], res[1]
    return out, lse.reshape(lse.shape[0], lse.shape[1], -1)[..., : q.shape[2]]  # [B, H, Sq(, 1)] -> [B, H, Sq]


def kernel_for(query: torch.Tensor, choice: int | None) -> tuple[str, Kernel] | None:
    """(name, kernel) that returns the normalizer for the backend `choice` on
    `query`'s device, or None (the math fallback, or a device with no such kernel)."""
    if query.device.type == "cpu":
        return ("flash_cpu", _flash_cpu) if choice == FLASH else None
    if not query.is_cuda:  # ROCm reports as CUDA too; other accelerators: the public path
        return None
    return {FLASH: ("flash", _flash), EFFICIENT: ("efficient", _efficient), CUDNN: ("cudnn", _cudnn)}.get(choice)


def _probe_inputs(query: torch.Tensor, masked: bool):
    """A small input like the real one (device, dtype, head dim, mask layout)."""
    g = torch.Generator().manual_seed(0)
    d, heads, sq, sk = query.shape[-1], 2, 64, 72  # sk: not a multiple of 16, so the mask is padded
    q, k, v = (torch.randn(1, heads, s, d, generator=g).to(device=query.device, dtype=query.dtype)
               for s in (sq, sk, sk))
    mask = None
    if masked:
        mask = torch.zeros(1, heads, 1, sk)
        mask[..., 60:] = -10000.0  # right padding, as the pipelines' text masks
        mask = mask.to(device=query.device, dtype=query.dtype)
    return q, k, v, mask


def _check(name: str, kernel: Kernel, query: torch.Tensor, masked: bool) -> str | None:
    """None if `kernel` gives a correct normalizer and F.sdpa's output bits on a small
    input; else why not."""
    q, k, v, mask = _probe_inputs(query, masked)
    try:
        with torch.no_grad():
            out, lse = kernel(q, k, v, mask)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask.float()
    want = logits.logsumexp(-1)  # [1, H, Sq]
    if tuple(lse.shape) != tuple(want.shape):
        return f"normalizer shape {tuple(lse.shape)}, expected {tuple(want.shape)}"
    tol = 1e-4 if q.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(lse.float(), want, rtol=tol, atol=tol):
        return f"normalizer off by up to {float((lse.float() - want).abs().max()):.3g}"
    same = kernel_for(q, backend_choice(q, k, v, mask))
    if same is not None and same[0] == name:  # F.sdpa runs this kernel here too: same bits
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if not torch.equal(out, ref):
            return "its output differs from F.scaled_dot_product_attention's"
    return None


def _trust_key(name: str, query: torch.Tensor, masked: bool) -> tuple:
    return name, query.device.type, query.device.index, query.dtype, query.shape[-1], masked


def trusted(name: str, kernel: Kernel, query: torch.Tensor, masked: bool) -> bool:
    """Whether `kernel`'s normalizer can be used for inputs like `query` (checked once)."""
    key = _trust_key(name, query, masked)
    ok = _TRUSTED.get(key)
    if ok is None:
        why = _check(name, kernel, query, masked)
        ok = why is None
        _TRUSTED[key] = ok
        if not ok:
            warnings.warn(
                f"ditloc: the {name} attention kernel's softmax normalizer failed its check on "
                f"{query.device} {query.dtype} ({why}); recomputing it from q·k instead (slower, same scores)",
                RuntimeWarning, stacklevel=3,
            )
    return ok


def sdpa_with_lse(query, key, value, attn_mask=None):
    """`F.scaled_dot_product_attention(query, key, value, attn_mask)` ([B, H, S, d],
    no dropout, not causal) and, where the kernel PyTorch picks for these inputs
    computes it, each query row's logsumexp [B, H, Sq] (float32; else None).

    The output is bit-identical to the public function's. Nothing here reads a
    tensor value on the host (after the one-time check of each kernel).
    """
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if not needs_grad and query.ndim == 4:
        found = kernel_for(query, backend_choice(query, key, value, attn_mask))
        if found is not None and trusted(*found, query, attn_mask is not None):
            try:
                return found[1](query, key, value, attn_mask)
            except (RuntimeError, TypeError, NotImplementedError):  # inputs the check did not cover
                _TRUSTED[_trust_key(found[0], query, attn_mask is not None)] = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False), None
