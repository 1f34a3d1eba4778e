"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): MM-DiT joint attention.

Blocks `block.0` ...; SD3.5's dual-attention blocks add an image-only `attn2`,
which reads no text: the text is read in `attn` in every block. Joint sequence
order: image first. The text sequence is the CLIP-L/CLIP-G part (77 positions,
the two encoders concatenated along channels) followed by the T5 part.

Concept positions (`text_stream`, a pipeline-call setting of ours): "both"
(default when T5 is loaded: the concept's tokens in the CLIP part and in the T5
part), "clip" (default without T5, whose part is then zeros) or "t5".
"""

from __future__ import annotations

import torch

from ..errors import DitlocError
from ..processors_joint import SD3JointProcessor
from .joint_attention import JointAttentionAdapter

STREAMS = ("both", "clip", "t5")


class SD3Adapter(JointAttentionAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    options = {"text_stream": None}  # "both" | "clip" | "t5"; None: "both" with T5 loaded, else "clip"

    lora_suffixes = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",  # SD3.5 dual attention
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )

    def blocks(self):
        return [(f"block.{i}", b, b.attn) for i, b in enumerate(self.transformer.transformer_blocks)]

    def text_streams(self, prompt: str, call_kwargs: dict):
        pipe = self.pipe
        stream = self.text_stream or ("both" if pipe.text_encoder_3 is not None else "clip")
        if stream not in STREAMS:
            raise DitlocError(f"text_stream must be one of {', '.join(STREAMS)}, got {stream!r}")
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
