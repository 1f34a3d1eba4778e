"""What the gradient-ranked search differentiates.

With an evaluator that is differentiable in the pixels (`Evaluator.differentiable`), a
gate's effect is read on the concept's *presence*: at a denoising step, the model's
prediction gives the clean sample it implies (``NoiseRule.x0``), the VAE decodes it and the
evaluator scores the concept in it, all differentiable in the blocks' gates. Presence is
what the search minimises, so its derivative sees what a move of the prediction alone
cannot: a block whose withholding matters only once its backup is withheld too.
"""

from __future__ import annotations

import torch

from ..noise import NoiseRule


class PredictedPresence:
    """``(prediction, x_t, timestep) -> [n]``: the evaluator's presence of `text` in the clean
    image each conditional row's prediction implies (the objective of `CausalProbe`)."""

    def __init__(self, adapter, evaluator, text: str):
        self.adapter = adapter
        self.evaluator = evaluator
        self.text = text
        self.rule = NoiseRule.from_scheduler(adapter.pipe.scheduler)

    def __call__(self, prediction: torch.Tensor, x_t: torch.Tensor, timestep) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=x_t.device, dtype=torch.float32).reshape(-1)
        t = t.expand(x_t.shape[0]) * self.adapter.timestep_scale  # [n], 0..1000
        x0 = self.rule.x0(x_t.float(), t, prediction.float())  # the pipeline's latent layout
        images = self.adapter.decode(x0)  # [n, 3, H, W] in [0, 1]
        return self.evaluator.score_tensor(images, self.text)  # [n]
