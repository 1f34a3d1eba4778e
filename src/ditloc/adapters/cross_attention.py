"""Shared logic of the cross-attention DiTs (PixArt-alpha/Sigma, SANA): text enters
every block through `attn2`, with a padding mask; CFG batches are [uncond, cond]."""

from __future__ import annotations

import torch

from ..errors import DitlocError
from ..processors import CrossAttentionProcessor
from ..tokens import ConceptSpan, find_occurrences, token_positions
from .base import Adapter


class CrossAttentionAdapter(Adapter):
    #: True where the family's processor applies q/k norms before splitting heads (SANA)
    qk_norm_before_split: bool = False
    #: transformer.config.sample_size values the pipeline's resolution binning accepts
    binned_sample_sizes: tuple[int, ...] = ()

    def block_names(self) -> list[str]:
        return [f"block.{i}" for i in range(len(self.transformer.transformer_blocks))]

    def block_module(self, block: str) -> torch.nn.Module:
        return self.transformer.transformer_blocks[self.block_names().index(block)]

    def text_attention(self, block: str) -> torch.nn.Module:
        index = self.block_names().index(block)
        attn = self.transformer.transformer_blocks[index].attn2
        if attn is None:
            raise DitlocError(f"{block} has no cross-attention; this checkpoint does not read text there")
        return attn

    def default_call_kwargs(self) -> dict:
        if self.transformer.config.sample_size not in self.binned_sample_sizes:
            return {"use_resolution_binning": False}
        return {}

    def cond_rows(self, batch: int, n_images: int) -> slice:
        if batch == 2 * n_images:  # classifier-free guidance: [uncond, cond]
            return slice(n_images, 2 * n_images)
        if batch == n_images:
            return slice(0, n_images)
        raise RuntimeError(f"unexpected transformer batch {batch} for {n_images} images")

    # ---- text ------------------------------------------------------------------------
    def _setting(self, call_kwargs: dict, name: str):
        return call_kwargs[name] if call_kwargs.get(name) is not None else self.call_default(name)

    def preprocess(self, prompt: str, call_kwargs: dict) -> str:
        """The prompt as the pipeline hands it to the tokenizer (lowercased, cleaned)."""
        clean_caption = bool(self._setting(call_kwargs, "clean_caption"))
        return self.pipe._text_preprocessing(prompt, clean_caption=clean_caption)[0]

    def _tokenized_text(self, text: str, call_kwargs: dict) -> tuple[str, int, int, int]:
        """(text fed to the tokenizer, offset of the prompt in it, tokenized length,
        index shift from tokenizer positions to embedding positions)."""
        return text, 0, int(self._setting(call_kwargs, "max_sequence_length")), 0

    def _to_embedding_positions(self, positions: list[int], shift: int, length: int) -> list[int]:
        return [p - shift for p in positions]

    def concept_span(self, prompt: str, concept: str, call_kwargs: dict) -> ConceptSpan:
        if not concept or not concept.strip():
            raise DitlocError("the concept is empty; pass the words to localize, e.g. --concept 'van gogh'")
        text = self.preprocess(prompt, call_kwargs)
        needle = self.preprocess(concept, call_kwargs)
        spans = find_occurrences(text, needle) or find_occurrences(text, concept)
        if not spans:
            raise DitlocError(
                f"concept {concept!r} is not in prompt {prompt!r} (the model reads {text!r}); "
                "use a prompt that contains it"
            )
        fed, offset, length, shift = self._tokenized_text(text, call_kwargs)
        shifted = [(a + offset, b + offset) for a, b in spans]
        kept, tokens = token_positions(
            self.pipe.tokenizer, fed, shifted, max_length=length, prompt=prompt, concept=concept
        )
        positions = sorted({p for occ in kept for p in self._to_embedding_positions(occ, shift, length)})
        return ConceptSpan(
            prompt=prompt,
            concept=concept,
            text=text,
            char_spans=tuple(spans),
            positions=tuple(positions),
            tokens=tuple(tokens),
        )

    def _encode_kwargs(self, call_kwargs: dict) -> dict:
        return {
            "clean_caption": bool(self._setting(call_kwargs, "clean_caption")),
            "max_sequence_length": int(self._setting(call_kwargs, "max_sequence_length")),
        }

    def encode_text(self, prompts: list[str], call_kwargs: dict) -> dict:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.pipe._execution_device,
            **self._encode_kwargs(call_kwargs),
        )
        return {"embeds": embeds, "mask": mask}

    # ---- training ---------------------------------------------------------------------
    def transformer_kwargs(self, latents: torch.Tensor) -> dict:
        """Extra forward arguments the family's pipeline passes (none by default)."""
        return {}

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, text: dict) -> torch.Tensor:
        out = self.transformer(
            latents,  # [B, C, h, w]
            encoder_hidden_states=text["embeds"],  # [B, L, D_text]
            encoder_attention_mask=text["mask"],  # [B, L]
            timestep=timestep,  # [B]
            return_dict=False,
            **self.transformer_kwargs(latents),
        )[0]
        channels = latents.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # learned sigma -> drop

    # ---- instrumentation -------------------------------------------------------------
    def make_processor(self, block: str, index: int, attn, state) -> CrossAttentionProcessor:
        return CrossAttentionProcessor(
            inner=attn.processor,
            block=block,
            index=index,
            state=state,
            qk_norm_before_split=self.qk_norm_before_split,
        )

    def project_text(self, embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Text conditioning as the blocks receive it (the transformer's own projection)."""
        raise NotImplementedError

    @staticmethod
    def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The transformer's conversion of a [B, L] keep-mask to an additive [B, 1, L] bias."""
        return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)

    def on_forward(self, state, args: tuple, kwargs: dict) -> None:
        state.step += 1
        swapping = state.swap is not None and bool(state.swap.blocks)
        if swapping:
            self._prepare_swap(state, args, kwargs)
        state.key_limit = None
        mask = kwargs.get("encoder_attention_mask")  # [B, L] keep-mask (right-padded text)
        if state.probe is not None and mask is not None and mask.ndim == 2:
            used = mask.to(torch.bool).any(0)  # [L]: key read by some row
            if swapping:
                used = used | state.swap.clean["mask"].to(device=used.device, dtype=torch.bool).any(0)
            state.key_limit = int(used.nonzero().max()) + 1 if bool(used.any()) else None

    def _prepare_swap(self, state, args: tuple, kwargs: dict) -> None:
        swap = state.swap
        hidden_states = args[0] if args else kwargs["hidden_states"]
        embeds = kwargs["encoder_hidden_states"]  # [B, L, C], raw text-encoder output
        mask = kwargs.get("encoder_attention_mask")  # [B, L] keep-mask
        rows = self.cond_rows(embeds.shape[0], state.n_images)
        clean = swap.clean["embeds"].to(device=embeds.device, dtype=embeds.dtype)  # [n, L, C]
        if clean.shape[1:] != embeds.shape[1:]:
            raise DitlocError(
                f"clean-prompt text conditioning has shape {tuple(clean.shape[1:])} but the prompt's has "
                f"{tuple(embeds.shape[1:])}; use the same max_sequence_length for both"
            )
        raw = embeds.clone()
        raw[rows] = clean
        swap.states = self.project_text(raw, hidden_states)  # [B, L, D]
        if mask is None:
            swap.mask = None
        else:
            m = mask.clone()
            m[rows] = swap.clean["mask"].to(device=mask.device, dtype=mask.dtype)
            swap.mask = self.mask_to_bias(m, hidden_states.dtype)  # [B, 1, L]
