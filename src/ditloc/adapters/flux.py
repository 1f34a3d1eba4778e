"""FLUX.1 (`FluxTransformer2DModel`): T5 text stream + CLIP pooled embedding.

Blocks: the double-stream `transformer_blocks` (`double.0` ...) then the
single-stream `single_transformer_blocks` (`single.0` ...), ranked together.
Joint sequence order: text first. Concept positions come from `tokenizer_2` (T5)
on `prompt_2` (which defaults to the prompt): that is the text stream the
transformer reads; the CLIP tokens only feed the pooled embedding.

Single-stream blocks have no attention output projection of their own: the
block computes `proj_out(concat(attn_out, mlp_out))`, so the attention output's
projection is the slice `proj_out.weight[:, :dim]` (its bias is the block's
output bias, added only with `out_bias=True`). The block's gate is not included.
"""

from __future__ import annotations

import torch

from ..engine import sdpa_with_lse
from ..errors import DitlocError
from ..offload import stored
from .joint_attention import JointAttentionAdapter, JointProcessor


class FluxAdapter(JointAttentionAdapter):
    family = "flux"
    timestep_scale = 1000.0  # the pipeline passes t / 1000
    transformer_classes = ("FluxTransformer2DModel",)
    text_encoder_names = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))  # CLIP (pooled), T5

    lora_suffixes = (
        # double-stream blocks
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        # single-stream blocks
        "proj_mlp", "proj_out",
    )

    @property
    def uses_guidance_scale(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)  # else true CFG: `true_cfg_scale`, `negative_prompt`

    @property
    def guidance_argument(self) -> str:
        # with a guidance embedding (FLUX.1-dev) `guidance_scale` feeds it; without one (base models,
        # FLUX.1-schnell) the pipeline's classifier-free guidance is `true_cfg_scale`
        return "guidance_scale" if self.uses_guidance_scale else "true_cfg_scale"

    def blocks(self):
        t = self.transformer
        double = [(f"double.{i}", b, b.attn) for i, b in enumerate(t.transformer_blocks)]
        single = [(f"single.{i}", b, b.attn) for i, b in enumerate(t.single_transformer_blocks)]
        return double + single

    def out_projection(self, block: str):
        if block.startswith("single."):
            b = self.transformer.single_transformer_blocks[int(block.split(".")[1])]
            dim = b.proj_out.in_features - b.mlp_hidden_dim
            return lambda: (stored(b.proj_out, "weight")[:, :dim], stored(b.proj_out, "bias"))
        return super().out_projection(block)

    def text_projections(self, block: str) -> list[str]:
        if block.startswith("single."):
            raise DitlocError(f"{block} is a single-stream block: its key/value projections act on image and text "
                              "tokens alike, so a text edit there would change image features too; choose "
                              "double-stream blocks (double.N)")
        return super().text_projections(block)

    def text_streams(self, prompt: str, call_kwargs: dict):
        text = call_kwargs.get("prompt_2") or prompt
        length = int(call_kwargs.get("max_sequence_length") or self.call_default("max_sequence_length") or 512)
        return [(self.pipe.tokenizer_2, text, length, 0)]

    def encode_text(self, prompts: list[str], call_kwargs: dict) -> dict:
        length = int(call_kwargs.get("max_sequence_length") or self.call_default("max_sequence_length") or 512)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.pipe._execution_device, num_images_per_prompt=1,
            max_sequence_length=length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def _latent_hw(self) -> tuple[int, int]:
        side = int(self.pipe.default_sample_size)  # pixels = side * vae_scale_factor
        return side, side

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: dict) -> torch.Tensor:
        pipe, t = self.pipe, self.transformer
        b, c, h, w = latents.shape
        packed = pipe._pack_latents(latents, b, c, h, w)  # [B, h/2 * w/2, 4C]
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(text["embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if t.config.guidance_embeds:  # guidance-distilled (FLUX.1-dev): the pipeline's default scale
            guidance = torch.full([b], float(self.call_default("guidance_scale") or 3.5), device=latents.device)
        out = t(
            hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=text["pooled"], encoder_hidden_states=text["embeds"],
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]  # [B, h/2 * w/2, 4C]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)  # [B, C, h, w]

    def image_size(self) -> tuple[int, int]:
        # the transformer has no sample size: the pipeline's default
        side = int(self.pipe.default_sample_size) * self.pipe.vae_scale_factor
        return side, side

    def unpack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim == 4:
            return latents
        n = latents.shape[1]  # packed tokens = (h/2) * (w/2), square images
        side = int(round(n ** 0.5)) * 2
        scale = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(latents, side * scale, side * scale, scale)

    def make_processor(self, block: str, index: int, attn, state):
        return FluxJointProcessor(attn.processor, block, index, state, self.out_projection(block))


class FluxJointProcessor(JointProcessor):
    """Mirror of diffusers' `FluxAttnProcessor` (double- and single-stream blocks).
    Layout [B, S, H, d]; text first. Single-stream blocks receive the joint sequence
    as `hidden_states`; its text length comes from the forward context (`n_text`)."""

    text_first = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self._busy():
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        backend = getattr(self.inner, "_attention_backend", None)
        parallel = getattr(self.inner, "_parallel_config", None)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))  # [B, S, H, d]
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [B, L+N, H, d]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        lse = None
        if backend is None and parallel is None and attention_mask is None and self.session.probe is not None:
            # the native backend permutes to [B, H, S, d] and calls F.scaled_dot_product_attention
            out, lse = sdpa_with_lse(query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3))
            out = out.permute(0, 2, 1, 3)  # [B, S, H, d]
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend,
                                        parallel_config=parallel)
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.session.context.n_text

        def attend(q, k, v):  # canonical [n, H, S, d] in and out, same kernel
            o = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      backend=backend, parallel_config=parallel)
            return o.transpose(1, 2)

        override = self._instrument(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), n_text, attend,
                                    lse)
        if override is not None:
            rows, image_out, alpha, heads = override
            out = out.clone()
            out[rows, n_text:] = self._mix(out[rows, n_text:], image_out.transpose(1, 2), alpha, heads, head_dim=2)
        out = out.flatten(2, 3).to(query.dtype)  # [B, S, H*d]
        if encoder_hidden_states is not None:
            encoder_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            out = attn.to_out[0](out.contiguous())
            out = attn.to_out[1](out)
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return out, encoder_out
        return out
