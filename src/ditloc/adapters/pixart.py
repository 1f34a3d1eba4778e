"""PixArt-alpha and PixArt-Sigma (`PixArtTransformer2DModel`): T5 text, `attn2` per block."""

from __future__ import annotations

import torch

from ..errors import DitlocError
from .cross_attention import CrossAttentionAdapter


class PixArtAdapter(CrossAttentionAdapter):
    family = "pixart"
    transformer_classes = ("PixArtTransformer2DModel",)
    qk_norm_before_split = False  # diffusers' AttnProcessor2_0
    binned_sample_sizes = (32, 64, 128, 256)
    lora_suffixes = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
        "ff.net.0.proj", "ff.net.2",
    )

    def check_call(self, call_kwargs: dict) -> None:
        # PixArtAlphaPipeline takes element [1] of the scheduler's step output for a single step,
        # which only few-step schedulers return (the denoised sample); others crash inside it
        steps = call_kwargs.get("num_inference_steps") or self.call_default("num_inference_steps")
        few_step = type(self.pipe.scheduler).__name__ in ("LCMScheduler", "TCDScheduler")
        if steps == 1 and type(self.pipe).__name__ == "PixArtAlphaPipeline" and not few_step:
            raise DitlocError(f"PixArtAlphaPipeline cannot sample 1 step with {type(self.pipe.scheduler).__name__} "
                              "(only with a few-step scheduler such as LCM); use 2 or more steps")

    def transformer_kwargs(self, latents: torch.Tensor) -> dict:
        # what PixArtAlphaPipeline passes: size conditions only for checkpoints that use them
        if not self.transformer.config.use_additional_conditions:
            return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        b, _, h, w = latents.shape
        scale = self.pipe.vae_scale_factor
        size = torch.tensor([h * scale, w * scale], device=latents.device, dtype=latents.dtype)
        return {
            "added_cond_kwargs": {
                "resolution": size.repeat(b, 1),  # [B, 2]
                "aspect_ratio": (size[0] / size[1]).view(1, 1).repeat(b, 1),  # [B, 1]
            }
        }

    def project_text(self, embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        if t.caption_projection is None:
            return embeds
        batch = hidden_states.shape[0]
        width = t.config.num_attention_heads * t.config.attention_head_dim
        return t.caption_projection(embeds).view(batch, -1, width)  # [B, L, D]
