"""The scheduler's noising rule, read from its config: how a training step noises a clean sample,
what the model regresses onto, and which clean sample a prediction implies. Localization (the
gradient-ranked search, the self objective) and editing (training, closed form) both use it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .devices import to_device
from .errors import DitlocError


@dataclass(frozen=True)
class NoiseRule:
    """x_t and the regression target for a training step, as the pipeline's
    scheduler defines them: DDPM (epsilon or v prediction) or flow matching."""

    kind: str  # "epsilon" | "v_prediction" | "flow"
    alphas_cumprod: torch.Tensor | None = field(default=None, repr=False)  # [T]
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseRule":
        cfg = scheduler.config
        n = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("prediction_type") == "flow_prediction" or "FlowMatch" in type(scheduler).__name__ \
                or cfg.get("use_flow_sigmas"):
            return cls("flow", None, n)
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: cfg[k] for k in keys if cfg.get(k) is not None})
        kind = cfg.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction"):
            raise DitlocError(f"scheduler prediction_type {kind!r} is not supported for training")
        return cls(kind, ddpm.alphas_cumprod, n)

    def x0(self, x_t: torch.Tensor, timestep: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean sample a prediction implies at `timestep` [B] (the scheduler's 0..1000
        scale); differentiable in `prediction`."""
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        if self.kind == "flow":
            sigma = (timestep.to(x_t.device, torch.float32) / self.num_train_timesteps).view(shape)
            return x_t - sigma.to(x_t.dtype) * prediction
        t = timestep.to(x_t.device).round().long().clamp(0, self.num_train_timesteps - 1)  # stays on the device
        a = to_device(self.alphas_cumprod, x_t.device, x_t.dtype)[t].view(shape)
        if self.kind == "epsilon":
            return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction  # v prediction

    def sample(self, x0: torch.Tensor, generator: torch.Generator):
        """-> (x_t [B, C, h, w], timestep [B], target [B, C, h, w]). The draws come from
        the host `generator` (the same numbers on any device) and reach the device
        without a synchronisation (:func:`to_device`)."""
        b = x0.shape[0]
        noise = to_device(torch.randn(x0.shape, generator=generator, dtype=torch.float32), x0.device, x0.dtype)
        u = torch.rand(b, generator=generator, dtype=torch.float32)  # [B]
        return self.noised(x0, u, noise)

    def noised(self, x0: torch.Tensor, u: torch.Tensor, noise: torch.Tensor):
        """-> (x_t, timestep [B], target) at noise levels `u` [B] in [0, 1) (host tensor; 0 is
        clean, 1 pure noise) with `noise` like `x0` (on its device)."""
        if self.kind == "flow":
            sigma = to_device(u, x0.device, x0.dtype).view(-1, 1, 1, 1)
            x_t = (1 - sigma) * x0 + sigma * noise
            return x_t, to_device(u * self.num_train_timesteps, x0.device), noise - x0
        t = (u * self.num_train_timesteps).long().clamp_max(self.num_train_timesteps - 1)  # [B]
        a = to_device(self.alphas_cumprod[t], x0.device, x0.dtype).view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return x_t, to_device(t, x0.device), target
