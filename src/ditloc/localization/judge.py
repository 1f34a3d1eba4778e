"""The model as its own judge: how much of a concept an
image holds, measured by the unedited model itself, with no evaluator.

A diffusion model is a classifier over its prompts: noise an image `x` to level `u`,
predict the noise (or velocity) once with the full prompt and once with the clean one;
the prompt whose prediction lands closer to the true target explains the image better
(Li et al., "Your diffusion model is secretly a zero-shot classifier", 2023). The raw
margin ``|pred_clean - target|² - |pred_full - target|²`` = ``2 <d, target - mid>``
(``d = pred_full - pred_clean``, `mid` their midpoint) scales with ``|d|²``: an image the
model finds strange (a withheld block that breaks it) makes both predictions wander and
the margin grow with no concept in it. That is why the raw margin read an unrelated block
as 14x *more* hazard mark. We divide by the same weights:

    q(x) = Σ_{u, draw} 2 <d, target - mid> / Σ_{u, draw} |d|²

the position of the true target along the line from the clean prediction (-1) to the full
one (+1), a ratio of sums over noise levels and draws (stable where `d` is small). Draws
are the same for every image of one (prompt, seed) sample (common random numbers), so
two block sets are compared on the same noise. Presence then puts the unedited images at 1
and the clean prompt's at 0 (:func:`normalise`), so a threshold on it means the same for
every concept.
"""

from __future__ import annotations

import numpy as np
import torch

from ..noise import NoiseRule

#: noise levels (fraction of the way to pure noise) and draws per level
LEVELS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
DRAWS = 2
#: rows of one judging forward
JUDGE_ROWS = 256


class SelfJudge:
    """Scores q(x) (module doc) for final latents, with the pipeline's own model.

    `adapter`: the pipeline's adapter; `noise_rule`: `ditloc.noise.NoiseRule` of its
    scheduler (epsilon, v or flow-matching targets); `seed`: the draws' seed.
    """

    def __init__(self, adapter, *, levels=LEVELS, draws: int = DRAWS, seed: int = 0):
        self.adapter = adapter
        self.rule = NoiseRule.from_scheduler(adapter.pipe.scheduler)
        self.levels = tuple(float(u) for u in levels)
        self.draws = int(draws)
        self.seed = int(seed)
        self._noise: dict[tuple[int, tuple], torch.Tensor] = {}

    def _draws(self, sample: int, shape: tuple) -> torch.Tensor:
        """[levels x draws, C, h, w] host noise for one sample (the same for every block set)."""
        key = (sample, shape)
        if key not in self._noise:
            g = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + sample)
            self._noise[key] = torch.randn((len(self.levels) * self.draws, *shape), generator=g)
        return self._noise[key]

    @torch.no_grad()
    def q(self, latents: torch.Tensor, samples: list[int], full: dict, clean: dict) -> np.ndarray:
        """q [m] (float64) for final latents [m, C, h, w] (unpacked); `samples[i]`: image i's
        sample index (its draws); `full`/`clean`: `encode_text` of image i's prompt / clean
        prompt, row i each."""
        m = latents.shape[0]
        per = len(self.levels) * self.draws
        u = torch.tensor(self.levels, dtype=torch.float32).repeat_interleave(self.draws)  # [per]
        num = torch.zeros(m, dtype=torch.float64, device=latents.device)
        den = torch.zeros(m, dtype=torch.float64, device=latents.device)
        rows_per_image = 2 * per
        step = max(1, JUDGE_ROWS // rows_per_image)
        for start in range(0, m, step):
            idx = list(range(start, min(m, start + step)))
            k = len(idx)
            x0 = latents[idx].repeat_interleave(per, 0)  # [k*per, C, h, w]
            noise = torch.cat([self._draws(samples[i], tuple(latents.shape[1:])) for i in idx])
            noise = noise.to(device=latents.device, dtype=latents.dtype)
            x_t, t, target = self.rule.noised(x0, u.repeat(k), noise)
            text = {name: torch.cat([_rows(full[name], idx, per), _rows(clean[name], idx, per)])
                    for name in full if torch.is_tensor(full[name])}
            x_t = x_t.to(self.adapter.transformer.dtype)  # SANA's pipeline keeps latents in float32, casts per forward
            pred = self.adapter.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), text).double()
            pred_full, pred_clean = pred[: k * per].flatten(1), pred[k * per :].flatten(1)  # [k*per, E]
            target = target.double().flatten(1)
            d = pred_full - pred_clean
            margin = 2 * (d * (target - 0.5 * (pred_full + pred_clean))).sum(1)  # [k*per]
            num[start : start + k] = margin.view(k, per).sum(1)
            den[start : start + k] = (d * d).sum(1).view(k, per).sum(1)
        q = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
        return q.cpu().numpy()


def _rows(x: torch.Tensor, idx: list[int], per: int) -> torch.Tensor:
    return x[idx].repeat_interleave(per, 0)


def normalise(q: np.ndarray, q_full: float, q_clean: float) -> np.ndarray:
    """Presence from q: 1 at the unedited images' mean `q_full`, 0 at the clean prompt's
    mean `q_clean` (0 everywhere when the model cannot tell them apart)."""
    span = q_full - q_clean
    if not np.isfinite(span) or abs(span) < 1e-12:
        return np.zeros_like(q)
    return (q - q_clean) / span
