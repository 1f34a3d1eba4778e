"""Shared logic of the joint-attention DiTs (FLUX, SD3/SD3.5): text and image
tokens share one attention, and the text stream is itself updated block by block.

Withholding: at every denoising step the transformer first runs
on the clean prompts alone (same latents, timestep and guidance) and each
withheld block's text keys/values are kept; in the real pass, the image queries of
those blocks read them instead of the prompt's. The pooled text embedding, which
modulates every block, goes with the intervention (see `ditloc.generate`).
"""

from __future__ import annotations

import warnings

import torch

from ..engine import ForwardContext, JointSwap, Session, StopForward, concept_contribution
from ..errors import DitlocError
from ..offload import stored
from ..tokens import ConceptCutOff, ConceptSpan, find_occurrences, token_positions
from .base import Adapter


class JointAttentionAdapter(Adapter):
    has_pooled_text = True
    text_projection_suffixes = ("attn.add_k_proj", "attn.add_v_proj")
    text_states_depend_on_image = True
    #: forward keyword arguments that carry the batch dimension
    batched_kwargs: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")

    def pooled_projection(self) -> str:
        """``time_text_embed.text_embedder.linear_1``: the pooled CLIP vector's first projection (FLUX, SD3), whose
        output joins the timestep embedding that modulates every block."""
        path = "time_text_embed.text_embedder.linear_1"
        if not isinstance(dict(self.transformer.named_modules()).get(path), torch.nn.Linear):
            raise DitlocError(f"this {self.family} transformer has no {path}; --pooled-edit cannot find the pooled "
                              "vector's projection")
        return path

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
        """() -> (weight, bias) of the projection applied to the image tokens' attention output,
        as offloading keeps them (:func:`ditloc.offload.stored`: read before that projection runs)."""
        attn = self.text_attention(block)
        return lambda: (stored(attn.to_out[0], "weight"), stored(attn.to_out[0], "bias"))

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
        streams = self.text_streams(prompt, call_kwargs)
        cut: list[tuple[int, int, ConceptCutOff]] = []
        for tokenizer, text, length, offset in streams:
            occ = find_occurrences(text, concept)
            if not occ:
                raise DitlocError(f"concept {concept!r} is not in prompt {text!r}; use a prompt that contains it")
            try:
                kept, toks = token_positions(tokenizer, text, occ, max_length=length, prompt=text, concept=concept)
            except ConceptCutOff as error:  # past one encoder's tokens (SD3's 77 CLIP tokens): the other part counts
                cut.append((offset, length, error))
                continue
            positions += [offset + p for o in kept for p in o]
            tokens += toks
            if spans is None:
                spans, seen = occ, text
        if spans is None:  # the last part's is the error `max_sequence_length` can fix (SD3's T5 part)
            raise cut[-1][2]
        for offset, length, _ in cut:
            warnings.warn(f"concept {concept!r} is cut off in the {length}-token text part at positions {offset} to "
                          f"{offset + length - 1} in {prompt!r}; using its positions in the other part", stacklevel=2)
        return ConceptSpan(prompt=prompt, concept=concept, text=seen, char_spans=tuple(spans),
                           positions=tuple(sorted(set(positions))), tokens=tuple(tokens))

    def text_token_ids(self, prompt: str, call_kwargs: dict) -> list[int]:
        at = {}
        for tokenizer, text, length, offset in self.text_streams(prompt, call_kwargs):
            ids = tokenizer(text, truncation=True, max_length=length, padding="max_length")["input_ids"]
            for t, token in enumerate(ids):
                at.setdefault(offset + t, token)
        return [at.get(p, -1) for p in range(max(at) + 1)]

    def text_inputs(self, text: dict) -> dict:
        return {"encoder_hidden_states": text["embeds"], "pooled_projections": text["pooled"]}

    def prompt_embeds_kwargs(self, text: dict) -> dict:
        return {"prompt_embeds": text["embeds"], "pooled_prompt_embeds": text["pooled"]}

    # ---- instrumentation -------------------------------------------------------------
    def make_swap(self, blocks: frozenset[str], clean: dict, pooled_clean: bool) -> JointSwap:
        return JointSwap(blocks=blocks, clean=clean, pooled_clean=pooled_clean)

    def on_forward(self, session: Session, args: tuple, kwargs: dict):
        swap = session.swap
        if swap is not None and swap.capturing:  # our own clean-prompt pass
            return None
        embeds = kwargs["encoder_hidden_states"]
        # FLUX's true CFG calls the transformer again for the negative prompt: only the
        # call with the prompt's own text tensor is measured and intervened on. A guidance
        # forward that reads the prompt again (SD3.5's skip-layer guidance) is intervened on
        # as the step's own forward was, and not measured.
        key = embeds.data_ptr()
        if session.call_key is None:
            session.call_key = key
        measured = key == session.call_key
        if not measured and not self.rereads_prompt(kwargs):
            session.context = ForwardContext(step=session.forwards - 1, rows=None, active=False)
            return None
        step = session.forwards if measured else session.forwards - 1
        session.forwards += int(measured)
        swap = session.swap_at(step)
        batch = embeds.shape[0]
        rows = self.cond_rows(batch, session.n_images) if session.busy else None
        session.context = ForwardContext(step=step, rows=rows, n_text=embeds.shape[1], measured=measured)
        if swap is None:
            return None
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
            swap.capturing = True
            swap.stop_after = self._last_withheld(swap.blocks, clean_kwargs)
            try:
                with torch.no_grad():
                    self.transformer(*clean_args, **clean_kwargs)
            except StopForward:  # the clean pass ran up to the last withheld block
                pass
            finally:
                swap.capturing = False
                swap.stop_after = None
        if swap.pooled_clean:
            pooled = kwargs["pooled_projections"].clone()
            clean_pooled = clean["pooled"].to(device=pooled.device, dtype=pooled.dtype)  # [n, D]
            if swap.pooled_rows is not None:  # per image (set-level presence)
                clean_pooled = torch.where(swap.pooled_rows.view(-1, 1), clean_pooled, pooled[rows])
            pooled[rows] = clean_pooled
            kwargs["pooled_projections"] = pooled
        return args, kwargs


    def rereads_prompt(self, kwargs: dict) -> bool:
        """Whether a forward with other text than the step's first is a guidance pass over the
        prompt's conditional rows (it takes the swap, unmeasured) rather than a negative prompt's."""
        return False

    def _last_withheld(self, blocks, kwargs: dict) -> str | None:
        """The block after which the clean pass may stop (model order), or None to run
        it whole: when a LoRA scale rides in the attention kwargs, the transformer's
        forward must reach its end to unscale the LoRA layers (diffusers unscales in a
        `finally` only since its `apply_lora_scale` decorator; earlier versions did not)."""
        for name in ("joint_attention_kwargs", "attention_kwargs"):
            extra = kwargs.get(name)
            if isinstance(extra, dict) and extra.get("scale", 1.0) != 1.0:
                return None
        order = self.block_names()
        return max(blocks, key=order.index) if blocks else None


class JointProcessor:
    """What the joint-attention processors share: in canonical [B, H, S, d] layout,
    - measure: image queries over the concept's text keys, streaming (`concept_contribution`);
    - capture: in the clean-prompt pass, keep this block's text keys/values;
    - swap: image queries of the conditional rows read the clean text keys/values
      (their own image keys/values unchanged); text queries keep the full prompt.
    Each family's subclass mirrors its stock processor op for op (so outputs are
    bit-identical); blocks with nothing to do hand the call to the previous processor.
    """

    text_first: bool = True

    def __init__(self, inner, block: str, index: int, session: Session, out_projection):
        self.inner = inner
        self.block = block
        self.index = index
        self.session = session
        self.out_projection = out_projection  # () -> (weight [D, H*d], bias [D] | None)

    def _busy(self) -> bool:
        session = self.session
        swap = session.swap
        in_swap = swap is not None and self.block in swap.blocks
        if swap is not None and swap.capturing:  # the adapter's clean-prompt pass
            return in_swap
        ctx = session.context
        return ctx.active and ((session.probe is not None and ctx.measured) or in_swap)

    def _segments(self, total: int, n_text: int) -> tuple[slice, slice]:
        """(text, image) slices of the joint sequence."""
        if self.text_first:
            return slice(0, n_text), slice(n_text, total)
        return slice(total - n_text, total), slice(0, total - n_text)

    def _instrument(self, q, k, v, n_text: int, attend, lse=None):
        """q, k, v: [B, H, S, d] joint (post-norm, post-rope); lse [B, H, S] from the
        kernel or None. Returns (rows, image_out [n, H, N, d], alpha, heads) when the image
        outputs of `rows` must be replaced (`alpha`: mix weights, `heads`: the heads that
        take them, see :meth:`_mix`)."""
        session, ctx = self.session, self.session.context
        swap = session.swap
        txt, img = self._segments(k.shape[2], n_text)
        if swap is not None and swap.capturing:
            swap.text_kv[self.block] = (k[:, :, txt], v[:, :, txt])  # [n, H, L, d] of the clean prompts
            if swap.stop_after == self.block:
                raise StopForward  # nothing after this block is read: end the clean pass here
            return None
        rows = ctx.rows
        if session.probe is not None and ctx.measured:
            probe = session.probe
            weight, bias = self.out_projection()
            with torch.no_grad():
                total, per_head = concept_contribution(
                    q[rows][:, :, img],
                    k[rows],
                    v[rows],
                    probe.positions + txt.start,
                    probe.valid,
                    out_weight=weight,
                    out_bias=bias if probe.out_bias else None,
                    terms=probe.terms,
                    lse=None if lse is None else lse[rows][:, :, img],
                    max_position=probe.max_position + txt.start,
                )
            probe.record(self.index, ctx.step, total, per_head)
        if swap is not None and self.block in swap.blocks:
            rows = swap.rows_for(self.block, rows)
            ck, cv = swap.text_kv[self.block]
            kr, vr = k[rows], v[rows]
            if self.text_first:
                k2, v2 = torch.cat([ck, kr[:, :, img]], dim=2), torch.cat([cv, vr[:, :, img]], dim=2)
            else:
                k2, v2 = torch.cat([kr[:, :, img], ck], dim=2), torch.cat([vr[:, :, img], cv], dim=2)
            alpha = None if swap.alpha is None else swap.alpha[self.block]
            if swap.row_masks is not None:  # per-image block sets: only the masked images take the swap
                alpha = swap.row_masks[self.block]  # bool [n]
            # image_out [n, H, N, d]; heads: bool [H] or None (every head)
            return rows, attend(q[rows][:, :, img], k2, v2), alpha, swap.heads_of(self.block)
        return None

    @staticmethod
    def _mix(current: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor | None,
             heads: torch.Tensor | None = None, head_dim: int = 1) -> torch.Tensor:
        """The image outputs that replace `current`: `new`, or with attribution weights
        ``current + alpha * (new - current)`` (differentiable in alpha), or with a bool
        `alpha` [n] (per-image block sets) `new` in the masked rows and `current` elsewhere.
        `heads` (bool [H], along dimension `head_dim`): only those heads take `new`."""
        new = new.to(current.dtype)
        if heads is not None:
            shape = [1] * current.ndim
            shape[head_dim] = -1
            new = torch.where(heads.to(current.device).view(shape), new, current)
        if alpha is None:
            return new
        if alpha.dtype == torch.bool:
            return torch.where(alpha.view(-1, *([1] * (current.ndim - 1))), new, current)
        a = alpha.to(current.dtype).view(-1, *([1] * (current.ndim - 1)))
        return current + a * (new - current)
