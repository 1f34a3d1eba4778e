"""PixArt-alpha and PixArt-Sigma (`PixArtTransformer2DModel`): T5 text, `attn2` per block."""

from __future__ import annotations

import torch

from .cross_attention import CrossAttentionAdapter


class PixArtAdapter(CrossAttentionAdapter):
    family = "pixart"
    transformer_classes = ("PixArtTransformer2DModel",)
    qk_norm_before_split = False  # diffusers' AttnProcessor2_0
    binned_sample_sizes = (32, 64, 128, 256)

    def project_text(self, embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        if t.caption_projection is None:
            return embeds
        batch = hidden_states.shape[0]
        width = t.config.num_attention_heads * t.config.attention_head_dim
        return t.caption_projection(embeds).view(batch, -1, width)  # [B, L, D]
