"""SANA (`SanaTransformer2DModel`): Gemma-2 text, `attn2` per block.

SANA's pipeline prepends a long "complex human instruction" to every prompt,
tokenizes to `n_instruction + max_sequence_length - 2` tokens and keeps position
0 plus the last `max_sequence_length - 1` positions. Concept positions are those
in that cropped sequence, which is what the transformer receives.
"""

from __future__ import annotations

import torch

from .cross_attention import CrossAttentionAdapter


class SanaAdapter(CrossAttentionAdapter):
    family = "sana"
    transformer_classes = ("SanaTransformer2DModel",)
    qk_norm_before_split = True  # SanaAttnProcessor2_0 normalizes q/k across heads
    binned_sample_sizes = (16, 32, 64, 128)
    lora_suffixes = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
        "ff.conv_inverted", "ff.conv_point",
    )

    def _instruction(self, call_kwargs: dict) -> list[str] | None:
        if "complex_human_instruction" in call_kwargs:
            return call_kwargs["complex_human_instruction"]
        return self.call_default("complex_human_instruction")

    def _tokenized_text(self, text: str, call_kwargs: dict) -> tuple[str, int, int, int]:
        max_len = int(self._setting(call_kwargs, "max_sequence_length"))
        chi = self._instruction(call_kwargs)
        if not chi:
            return text, 0, max_len, 0
        chi_prompt = "\n".join(chi)
        n_chi = len(self.pipe.tokenizer.encode(chi_prompt))
        total = n_chi + max_len - 2
        # kept tokenizer positions: 0 and total-max_len+1 ... total-1 -> 0, 1 ... max_len-1
        return chi_prompt + text, len(chi_prompt), total, total - max_len

    def _to_embedding_positions(self, positions: list[int], shift: int, length: int) -> list[int]:
        out = []
        for p in positions:
            if p == 0:
                out.append(0)
            elif p - shift >= 1:
                out.append(p - shift)
            # else: dropped by the crop (only possible for an extremely long prompt tail)
        return out

    def _encode_kwargs(self, call_kwargs: dict) -> dict:
        kw = super()._encode_kwargs(call_kwargs)
        kw["complex_human_instruction"] = self._instruction(call_kwargs)
        return kw

    def project_text(self, embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        batch = hidden_states.shape[0]
        width = t.config.num_attention_heads * t.config.attention_head_dim
        states = t.caption_projection(embeds).view(batch, -1, width)  # [B, L, D]
        return t.caption_norm(states)
