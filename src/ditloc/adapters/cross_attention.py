"""Shared logic of the cross-attention DiTs (PixArt-alpha/Sigma, SANA): text enters
every block through `attn2`, with a padding mask; CFG batches are [uncond, cond]."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..engine import CrossSwap, ForwardContext, Session, concept_contribution, sdpa_with_lse
from ..errors import DitlocError
from ..offload import stored
from ..tokens import ConceptSpan, find_occurrences, token_positions
from .base import Adapter


def _caption_cleaning_available() -> bool:
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()


class CrossAttentionAdapter(Adapter):
    #: True where the family's processor applies q/k norms before splitting heads (SANA)
    qk_norm_before_split: bool = False
    #: transformer.config.sample_size values the pipeline's resolution binning accepts
    binned_sample_sizes: tuple[int, ...] = ()
    text_projection_suffixes = ("attn2.to_k", "attn2.to_v")

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

    def default_call_kwargs(self, given: dict | None = None) -> dict:
        given = given or {}
        kw = {}
        if self.transformer.config.sample_size not in self.binned_sample_sizes:
            kw["use_resolution_binning"] = False
        if "clean_caption" not in given and self.call_default("clean_caption") and not _caption_cleaning_available():
            # what the pipeline falls back to anyway, said once here instead of a log warning per prompt
            warnings.warn("beautifulsoup4/ftfy are not installed, so prompts are not caption-cleaned "
                          "(clean_caption=False); install both to clean them", stacklevel=2)
            kw["clean_caption"] = False
        return kw

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

    def text_token_ids(self, prompt: str, call_kwargs: dict) -> list[int]:
        text = self.preprocess(prompt, call_kwargs)
        fed, _, length, shift = self._tokenized_text(text, call_kwargs)
        ids = self.pipe.tokenizer(fed, add_special_tokens=True, truncation=True, max_length=length,
                                  padding="max_length")["input_ids"]
        at = {}
        for t, token in enumerate(ids):
            for p in self._to_embedding_positions([t], shift, length):
                at[p] = token
        return [at.get(p, -1) for p in range(max(at) + 1)]

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

    def text_inputs(self, text: dict) -> dict:
        return {"encoder_hidden_states": text["embeds"], "encoder_attention_mask": text["mask"]}

    def prompt_embeds_kwargs(self, text: dict) -> dict:
        return {"prompt_embeds": text["embeds"], "prompt_attention_mask": text["mask"]}

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
    def make_processor(self, block: str, index: int, attn, session: Session) -> "CrossAttentionProcessor":
        return CrossAttentionProcessor(
            inner=attn.processor,
            block=block,
            index=index,
            session=session,
            qk_norm_before_split=self.qk_norm_before_split,
        )

    def project_text(self, embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Text conditioning as the blocks receive it (the transformer's own projection)."""
        raise NotImplementedError

    @staticmethod
    def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The transformer's conversion of a [B, L] keep-mask to an additive [B, 1, L] bias."""
        return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)

    def make_swap(self, blocks: frozenset[str], clean: dict, pooled_clean: bool) -> CrossSwap:
        return CrossSwap(blocks=blocks, clean=clean)

    def on_forward(self, session: Session, args: tuple, kwargs: dict) -> None:
        step = session.forwards
        session.forwards += 1
        session.swap_at(step)
        latents = args[0] if args else kwargs["hidden_states"]  # [B, C, h, w]
        rows = self.cond_rows(latents.shape[0], session.n_images) if session.busy else None
        swapping = session.swap is not None and bool(session.swap.blocks)
        if swapping:
            self._prepare_swap(session.swap, rows, args, kwargs)
        key_limit = None
        mask = kwargs.get("encoder_attention_mask")  # [B, L] keep-mask (right-padded text)
        if session.probe is not None and mask is not None and mask.ndim == 2:
            key_limit = self._key_limit(session, mask, session.swap.clean["mask"] if swapping else None)
        session.context = ForwardContext(step=step, rows=rows, key_limit=key_limit)

    @staticmethod
    def _key_limit(session: Session, mask: torch.Tensor, clean_mask: torch.Tensor | None) -> int | None:
        """Text keys at and after this are padding in every row (None: no key is read).
        Read from the device once per pipeline call (the pipelines pass the same mask
        tensor at every step), not once per forward."""
        cache_key = ("key_limit", mask.data_ptr(), tuple(mask.shape),
                     None if clean_mask is None else clean_mask.data_ptr())
        if cache_key not in session.call_cache:
            used = mask.to(torch.bool).any(0)  # [L]: key read by some row
            if clean_mask is not None:
                used = used | clean_mask.to(device=used.device, dtype=torch.bool).any(0)
            last = int(torch.where(used, torch.arange(used.shape[0], device=used.device), -1).max())
            session.call_cache[cache_key] = last + 1 if last >= 0 else None
        return session.call_cache[cache_key]

    def _prepare_swap(self, swap: CrossSwap, rows: slice, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        embeds = kwargs["encoder_hidden_states"]  # [B, L, C], raw text-encoder output
        mask = kwargs.get("encoder_attention_mask")  # [B, L] keep-mask
        clean = swap.clean["embeds"].to(device=embeds.device, dtype=embeds.dtype)  # [n, L, C]
        if clean.shape[1:] != embeds.shape[1:]:
            raise DitlocError(
                f"clean-prompt text conditioning has shape {tuple(clean.shape[1:])} but the prompt's has "
                f"{tuple(embeds.shape[1:])}; use the same max_sequence_length for both"
            )
        raw = embeds.clone()
        raw[rows] = clean
        # projected where the first withheld block reads it, inside the forward (offloaded weights loaded)
        swap.states, swap.project = None, lambda: self.project_text(raw, hidden_states)  # () -> [B, L, D]
        if mask is None:
            swap.mask = None
        else:
            m = mask.clone()
            m[rows] = swap.clean["mask"].to(device=mask.device, dtype=mask.dtype)
            swap.mask = self.mask_to_bias(m, hidden_states.dtype)  # [B, 1, L]


def _batch_mask(mask: torch.Tensor, rows: slice, batch: int) -> torch.Tensor:
    """bool [B]: `mask` [n] over the conditional `rows` of a batch of `batch` rows, False
    elsewhere (an unconditional half never reads the clean prompt). No host synchronisation."""
    return torch.cat([mask.new_zeros(rows.start), mask, mask.new_zeros(batch - rows.stop)])


def _replace_rows(x: torch.Tensor, rows: slice, rows_value: torch.Tensor) -> torch.Tensor:
    """`x` with `x[rows]` replaced by `rows_value` (a new tensor, no host synchronisation)."""
    return torch.cat([x[: rows.start], rows_value.to(x.dtype), x[rows.stop :]])


class CrossAttentionProcessor:
    """Processor for a cross-attention module (`attn2`) of PixArt/SANA.

    Withheld blocks read the `CrossSwap`'s text conditioning. Without a probe the
    call is handed, otherwise unchanged, to the processor that was installed
    before (so outputs are bit-identical to a plain run). With a probe, or where
    only some heads read the clean text (`Swap.heads`), it runs the same computation
    as diffusers' `AttnProcessor2_0`/`SanaAttnProcessor2_0`: it measures the concept's
    contribution on the conditional rows, and the chosen heads' keys and values (and
    padding mask) are the clean text's while the other heads keep the prompt's.
    """

    def __init__(self, inner, block: str, index: int, session: Session, qk_norm_before_split: bool):
        self.inner = inner
        self.block = block
        self.index = index
        self.session = session
        self.qk_norm_before_split = qk_norm_before_split

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        swap = self.session.swap
        prompt_text = (encoder_hidden_states, attention_mask)  # what the block reads without the swap
        heads = None
        if swap is not None and self.block in swap.blocks:
            if swap.capturing:  # the clean-prompt pass: keep what this block reads
                swap.text_kv[self.block] = (encoder_hidden_states, attention_mask)
            elif swap.alpha is not None:  # attribution: full + alpha * (clean - full), differentiable
                if temb is not None:
                    kwargs["temb"] = temb
                clean_states, clean_mask = swap.text_kv[self.block]
                full = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
                clean = self.inner(attn, hidden_states, clean_states, clean_mask, **kwargs)
                alpha = swap.alpha[self.block].to(full.dtype).view(-1, *([1] * (full.ndim - 1)))
                return full + alpha * (clean - full)
            else:
                if swap.row_masks is not None:  # per-image block sets: the masked rows read the clean prompt
                    rows = _batch_mask(swap.row_masks[self.block], self.session.context.rows,
                                       encoder_hidden_states.shape[0]).view(-1, 1, 1)  # [B, 1, 1]
                    encoder_hidden_states = torch.where(rows, swap.text_states(), encoder_hidden_states)
                    if attention_mask is not None:
                        attention_mask = torch.where(rows, swap.mask, attention_mask)
                elif swap.row_slices is not None:  # batched variants: only these rows read the clean prompt
                    rows = swap.row_slices[self.block]
                    clean_states, clean_mask = swap.text_kv[self.block]
                    encoder_hidden_states = _replace_rows(encoder_hidden_states, rows, clean_states)
                    if attention_mask is not None:
                        attention_mask = _replace_rows(attention_mask, rows, clean_mask)
                else:
                    encoder_hidden_states, attention_mask = swap.text_states(), swap.mask
                heads = swap.heads_of(self.block)
        if heads is not None:  # only these heads read the clean text, the others the prompt's
            return self._attend(attn, hidden_states, *prompt_text, temb,
                                clean=(encoder_hidden_states, attention_mask, heads))
        if self.session.probe is None:
            if temb is not None:
                kwargs["temb"] = temb
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _key_value(self, attn, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text keys and values [B, H, L, d] that `states` [B, L, D] give, as the stock processor makes them."""
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        key = attn.to_k(states)  # [B, L, H*d]
        value = attn.to_v(states)
        if self.qk_norm_before_split and attn.norm_k is not None:
            key = attn.norm_k(key)
        batch, head_dim = key.shape[0], key.shape[-1] // attn.heads
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if not self.qk_norm_before_split and attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, value

    @staticmethod
    def _head_mask(attn, mask: torch.Tensor | None, text_len: int, batch: int) -> torch.Tensor | None:
        """The additive padding mask as the stock processor hands it to the kernel: [B, H, 1, L]."""
        if mask is None:
            return None
        mask = attn.prepare_attention_mask(mask, text_len, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])  # [B, H, 1, L]

    def _attend(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, clean=None):
        """The stock computation; with a probe, the concept's contribution is measured. `clean`:
        (states [B, L, D], additive mask [B, 1, L] or None, heads bool [H]): those heads read
        the clean text's keys, values and mask instead of the prompt's."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, text_len, _ = encoder_hidden_states.shape
        attention_mask = self._head_mask(attn, attention_mask, text_len, batch)  # [B, H, 1, L] or None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # [B, N, H*d]
        if self.qk_norm_before_split and attn.norm_q is not None:
            query = attn.norm_q(query)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N, d]
        if not self.qk_norm_before_split and attn.norm_q is not None:
            query = attn.norm_q(query)
        key, value = self._key_value(attn, encoder_hidden_states)  # [B, H, L, d]
        if clean is not None:
            clean_states, clean_mask, heads = clean
            clean_key, clean_value = self._key_value(attn, clean_states)
            pick = heads.to(key.device).view(1, -1, 1, 1)  # [1, H, 1, 1]
            key, value = torch.where(pick, clean_key, key), torch.where(pick, clean_value, value)
            clean_mask = self._head_mask(attn, clean_mask, text_len, batch)
            if attention_mask is not None and clean_mask is not None:
                attention_mask = torch.where(pick, clean_mask, attention_mask)

        if self.session.probe is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)  # [B, H, N, d]
        else:
            # the kernel F.scaled_dot_product_attention would run (same bits), and its softmax normalizer
            out, lse = sdpa_with_lse(query, key, value, attention_mask)  # [B, H, N, d], [B, H, N] or None
            self._record(attn, query, key, value, attention_mask, lse)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, N, H*d]
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @torch.no_grad()
    def _record(self, attn, query, key, value, mask, lse) -> None:
        probe, ctx = self.session.probe, self.session.context
        rows = ctx.rows
        proj = attn.to_out[0]  # read where offloading keeps it: under leaf-level offloading it has not run yet
        total, per_head = concept_contribution(
            query[rows],
            key[rows],
            value[rows],
            probe.positions,
            probe.valid,
            mask=None if mask is None else mask[rows],
            out_weight=stored(proj, "weight"),
            out_bias=stored(proj, "bias") if probe.out_bias else None,
            terms=probe.terms,
            key_limit=ctx.key_limit,
            lse=None if lse is None else lse[rows],
            max_position=probe.max_position,
        )
        probe.record(self.index, ctx.step, total, per_head)
