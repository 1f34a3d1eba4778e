"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): MM-DiT joint attention.

Blocks `block.0` ...; SD3.5's dual-attention blocks add an image-only `attn2`,
which reads no text: the text is read in `attn` in every block. SD3.5's skip-layer
guidance runs the transformer once more per step on the conditional rows: that
forward takes the intervention too, and is not measured. Joint sequence
order: image first. The text sequence is the CLIP-L/CLIP-G part (77 positions,
the two encoders concatenated along channels) followed by the T5 part.

Concept positions (adapter option `text_stream`, `--adapter-option text_stream=t5`): "both"
(default when T5 is loaded: the concept's tokens in the CLIP part and in the T5
part), "clip" (default without T5, whose part is then zeros) or "t5".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine import sdpa_with_lse
from ..errors import DitlocError
from .joint_attention import JointAttentionAdapter, JointProcessor

STREAMS = ("both", "clip", "t5")


class SD3Adapter(JointAttentionAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    options = {"text_stream": STREAMS}  # None: "both" with T5 loaded, else "clip"
    text_encoder_names = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),  # CLIP-L, CLIP-G
                          ("text_encoder_3", "tokenizer_3"))  # T5 (optional)

    lora_suffixes = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",  # SD3.5 dual attention
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )

    def blocks(self):
        return [(f"block.{i}", b, b.attn) for i, b in enumerate(self.transformer.transformer_blocks)]

    def rereads_prompt(self, kwargs: dict) -> bool:
        # skip-layer guidance (SD3.5, `skip_guidance_layers=`): the prompt's conditional rows
        # again with some blocks skipped; a withheld concept stays withheld there
        return kwargs.get("skip_layers") is not None

    def text_streams(self, prompt: str, call_kwargs: dict):
        pipe = self.pipe
        stream = self.text_stream or ("both" if pipe.text_encoder_3 is not None else "clip")
        if stream != "clip" and pipe.text_encoder_3 is None:
            raise DitlocError("this SD3 pipeline has no T5 encoder; use text_stream='clip'")
        clip_len = pipe.tokenizer_max_length
        t5_len = int(call_kwargs.get("max_sequence_length") or self.call_default("max_sequence_length") or 256)
        out = []
        if stream in ("both", "clip"):
            out.append((pipe.tokenizer, prompt, clip_len, 0))
        if stream in ("both", "t5"):
            out.append((pipe.tokenizer_3, call_kwargs.get("prompt_3") or prompt, t5_len, clip_len))
        return out

    def encode_text(self, prompts: list[str], call_kwargs: dict) -> dict:
        t5_len = int(call_kwargs.get("max_sequence_length") or self.call_default("max_sequence_length") or 256)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe._execution_device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=t5_len,
        )
        return {"embeds": embeds, "pooled": pooled}

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: dict) -> torch.Tensor:
        return self.transformer(
            hidden_states=latents,  # [B, C, h, w]
            timestep=timestep,  # [B], 0..1000 as the pipeline passes it
            encoder_hidden_states=text["embeds"],  # [B, 77 + L_t5, D]
            pooled_projections=text["pooled"],  # [B, D_pooled]
            return_dict=False,
        )[0]

    def make_processor(self, block: str, index: int, attn, state):
        return SD3JointProcessor(attn.processor, block, index, state, self.out_projection(block))


class SD3JointProcessor(JointProcessor):
    """Mirror of diffusers' `JointAttnProcessor2_0` (SD3/SD3.5). Layout [B, H, S, d]; image first."""

    text_first = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None or not self._busy():
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query = torch.cat([query, eq], dim=2)  # [B, H, N+L, d]
        key = torch.cat([key, ek], dim=2)
        value = torch.cat([value, ev], dim=2)

        out, lse = sdpa_with_lse(query, key, value)  # [B, H, N+L, d], [B, H, N+L] or None

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)

        n_text = encoder_hidden_states.shape[1]
        override = self._instrument(query, key, value, n_text, attend, lse)
        n_image = residual.shape[1]
        if override is not None:
            rows, image_out, alpha, heads = override
            out = out.clone()
            out[rows, :, :n_image] = self._mix(out[rows, :, :n_image], image_out, alpha, heads, head_dim=1)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out, encoder_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out, encoder_out
