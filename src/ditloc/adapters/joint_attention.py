"""Shared logic of the joint-attention DiTs (FLUX, SD3/SD3.5): text and image
tokens share one attention, and the text stream is itself updated block by block.

Withholding (method.md §2): at every denoising step the transformer first runs
on the clean prompts alone (same latents, timestep and guidance) and each
withheld block's text keys/values are kept; in the real pass, the image queries of
those blocks read them instead of the prompt's. The pooled text embedding, which
modulates every block, goes with the intervention (see `ditloc.generate`).
"""

from __future__ import annotations

import torch

from ..tokens import ConceptSpan, find_occurrences, token_positions
from ..errors import DitlocError
from .base import Adapter


class JointAttentionAdapter(Adapter):
    has_pooled_text = True
    #: forward keyword arguments that carry the batch dimension
    batched_kwargs: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")

    # ---- structure (subclasses list their stacks) --------------------------------------
    def blocks(self) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
        """(name, block, attention) in model order."""
        raise NotImplementedError

    def block_names(self) -> list[str]:
        return [name for name, _, _ in self.blocks()]

    def block_module(self, block: str) -> torch.nn.Module:
        for name, module, _ in self.blocks():
            if name == block:
                return module
        raise DitlocError(f"unknown block {block!r}")

    def text_attention(self, block: str) -> torch.nn.Module:
        for name, _, attn in self.blocks():
            if name == block:
                return attn
        raise DitlocError(f"unknown block {block!r}")

    def out_projection(self, block: str):
        """() -> (weight, bias) of the projection applied to the image tokens' attention output."""
        attn = self.text_attention(block)
        return lambda: (attn.to_out[0].weight, attn.to_out[0].bias)

    def cond_rows(self, batch: int, n_images: int) -> slice:
        if batch == 2 * n_images:  # batched CFG: [uncond, cond]
            return slice(n_images, 2 * n_images)
        if batch == n_images:  # guidance-distilled, or true CFG run as separate calls
            return slice(0, n_images)
        raise RuntimeError(f"unexpected transformer batch {batch} for {n_images} images")

    # ---- text ------------------------------------------------------------------------
    def text_streams(self, prompt: str, call_kwargs: dict) -> list[tuple[object, str, int, int]]:
        """(tokenizer, text it sees, tokenized length, offset in the transformer's text sequence)."""
        raise NotImplementedError

    def concept_span(self, prompt: str, concept: str, call_kwargs: dict) -> ConceptSpan:
        if not concept or not concept.strip():
            raise DitlocError("the concept is empty; pass the words to localize, e.g. --concept 'van gogh'")
        positions, tokens, spans, seen = [], [], None, None
        for tokenizer, text, length, offset in self.text_streams(prompt, call_kwargs):
            occ = find_occurrences(text, concept)
            if not occ:
                raise DitlocError(f"concept {concept!r} is not in prompt {text!r}; use a prompt that contains it")
            kept, toks = token_positions(tokenizer, text, occ, max_length=length, prompt=text, concept=concept)
            positions += [offset + p for o in kept for p in o]
            tokens += toks
            if spans is None:
                spans, seen = occ, text
        return ConceptSpan(prompt=prompt, concept=concept, text=seen, char_spans=tuple(spans),
                           positions=tuple(sorted(set(positions))), tokens=tuple(tokens))

    # ---- instrumentation -------------------------------------------------------------
    def on_forward(self, state, args: tuple, kwargs: dict):
        embeds = kwargs["encoder_hidden_states"]
        # FLUX's true CFG calls the transformer again for the negative prompt: only the
        # call with the prompt's own text tensor is measured and intervened on.
        key = embeds.data_ptr()
        if state.cond_key is None:
            state.cond_key = key
        state.active = key == state.cond_key
        if not state.active:
            return None
        state.step += 1
        state.n_text = embeds.shape[1]
        swap = state.swap
        if swap is None:
            return None
        batch = embeds.shape[0]
        rows = self.cond_rows(batch, state.n_images)
        kwargs = dict(kwargs)
        clean = swap.clean
        if swap.blocks:
            clean_kwargs = {
                k: (v[rows] if k in self.batched_kwargs and torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch else v)
                for k, v in kwargs.items()
            }
            clean_args = tuple(a[rows] if torch.is_tensor(a) and a.shape[0] == batch else a for a in args)
            clean_kwargs["encoder_hidden_states"] = clean["embeds"].to(device=embeds.device, dtype=embeds.dtype)
            clean_kwargs["pooled_projections"] = clean["pooled"].to(device=embeds.device, dtype=embeds.dtype)
            swap.text_kv = {}
            state.capturing = True
            try:
                with torch.no_grad():
                    self.transformer(*clean_args, **clean_kwargs)
            finally:
                state.capturing = False
        if swap.pooled_clean:
            pooled = kwargs["pooled_projections"].clone()
            pooled[rows] = clean["pooled"].to(device=pooled.device, dtype=pooled.dtype)
            kwargs["pooled_projections"] = pooled
        return args, kwargs
