"""Mixed precision for training (``TrainConfig.mixed_precision``, ``--mixed-precision``).

``"bf16"``: the frozen weights stay in the dtype the pipeline was loaded in (the
CLI loads bfloat16 for this mode, so a 12B base costs 2 bytes a parameter); the
trainable weights (LoRA A/B, or the trained blocks for ``full``) and the AdamW
moments are float32; the loss is computed under ``torch.autocast(bfloat16)``,
so matmuls run in bf16 and gradients land in the float32 weights. bf16 has
float32's exponent range, so no loss scaling is needed.

``"fp16"`` is refused: it needs a dynamic loss scale (a GradScaler whose state a
resumable checkpoint would also have to hold), and every accelerator that
trains models of this size has bf16.

"Supports bf16" (:func:`bf16_supported`): where the device's backend has a query
(``torch.cuda``/``torch.xpu``: ``is_bf16_supported``), native bf16 (CUDA: Ampere or
newer); elsewhere (CPU, MPS), a tiny matmul under bf16 autocast runs and gives a
bf16 result that matches float32 to bf16 precision. On x86 CPUs without
AVX512-BF16/AMX, PyTorch still computes bf16 (converting inside its kernels):
it halves the weights' memory but is not faster than float32.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import DitlocError

MIXED_PRECISION = ("no", "bf16")
FP16_REFUSED = ("--mixed-precision fp16 is not supported (it needs loss scaling); use bf16 "
                "(float32 trainable weights over bfloat16 base weights) or no")


def check_mode(mode: str) -> None:
    """A valid ``mixed_precision`` value, or one line saying what to use."""
    if mode == "fp16":
        raise DitlocError(FP16_REFUSED)
    if mode not in MIXED_PRECISION:
        raise DitlocError(f"unknown mixed precision {mode!r}; choose one of {', '.join(MIXED_PRECISION)}")


def bf16_supported(device) -> str | None:
    """None if `device` computes bf16 autocast; otherwise why not (one line)."""
    device = torch.device(device)
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...: the device's own query, if any
    native = getattr(backend, "is_bf16_supported", None) if device.type != "cpu" else None
    if native is not None:
        if not backend.is_available():
            return f"{device.type} is not available"
        try:
            ok = native(including_emulation=False)  # native bf16 (CUDA: Ampere or newer), not emulated
        except TypeError:  # backends whose query has no emulation flag
            ok = native()
        if ok:
            return None
        name = getattr(backend, "get_device_name", lambda *a: device.type)(device.index)
        return f"{name} has no native bf16"
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(8, 8, generator=g)
        b = torch.randn(8, 8, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            c = a.to(device) @ b.to(device)  # [8, 8]
        ok = c.dtype == torch.bfloat16 and torch.allclose(c.float().cpu(), a @ b, rtol=0.05, atol=0.05)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"bf16 autocast fails on {device.type}: {first}"
    return None if ok else f"bf16 autocast on {device.type} does not compute in bf16"


def check_device(mode: str, device, supported=None) -> None:
    """Refuse `mode` on a `device` that cannot run it (before any model loads).
    `supported`: the probe, default :func:`bf16_supported` (tests pass their own)."""
    check_mode(mode)
    if mode != "bf16":
        return
    probe = supported if supported is not None else bf16_supported
    why = probe(torch.device(device))
    if why is not None:
        raise DitlocError(f"--mixed-precision bf16 needs bf16 support on {device}: {why}; train without it "
                          "(--mixed-precision no) or on another device")


def check_base_dtype(mode: str, dtype: torch.dtype) -> None:
    """bf16 autocast over float16 weights would round them twice: refused."""
    if mode == "bf16" and dtype not in (torch.bfloat16, torch.float32):
        raise DitlocError(f"--mixed-precision bf16 trains over bfloat16 (or float32) base weights; "
                          f"the model is {str(dtype).removeprefix('torch.')} (load it with --dtype bfloat16)")


def autocast(mode: str, device):
    """The forward's context: bf16 autocast on `device`, or nothing."""
    if mode == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
