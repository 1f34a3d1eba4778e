"""Where training runs: small host tensors moved without a hidden synchronisation, and the
accelerator's peak memory and synchronisation (no-ops on the CPU), through ``torch.accelerator``
so that no device type is named."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A small host tensor drawn each training step (noise, timesteps, batch indices) on
    `device`. On an accelerator it goes through page-locked memory with a non-blocking
    copy: a plain copy from pageable memory waits for all queued device work first (a
    hidden synchronisation every step). The caching host allocator keeps the page-locked
    block alive until the copy has run. On the CPU it is ``t.to(device, dtype)``."""
    device = torch.device(device)
    if device.type != "cpu" and t.device.type == "cpu":
        try:
            t = t.pin_memory()
        except RuntimeError:  # no page-locked memory for this accelerator: a plain copy
            return t.to(device=device, dtype=dtype)
        t = t.to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def on_accelerator(device) -> bool:
    """Whether `device` is the machine's accelerator (CUDA, XPU, MPS, ...), not the CPU."""
    device = torch.device(device)
    if device.type == "cpu" or not torch.accelerator.is_available():
        return False
    return device.type == torch.accelerator.current_accelerator().type


def peak_memory(device) -> int | None:
    """Peak bytes allocated on an accelerator since the last reset; None on CPU."""
    if not on_accelerator(device):
        return None
    return int(torch.accelerator.max_memory_allocated(torch.device(device).index))


def reset_peak_memory(device) -> None:
    if on_accelerator(device):
        torch.accelerator.reset_peak_memory_stats(torch.device(device).index)


def synchronize(device) -> None:
    if on_accelerator(device):
        torch.accelerator.synchronize(torch.device(device).index)
