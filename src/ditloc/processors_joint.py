"""Processors for joint-attention DiTs (FLUX, SD3/SD3.5), where text and image
tokens share one attention (method.md §1-2).

Each processor mirrors its family's stock processor op for op (so outputs are
bit-identical) and, in canonical [B, H, S, d] layout, adds:
- measure: image queries over the concept's text keys, streaming (processors.concept_contribution);
- capture: in the clean-prompt pass, keep this block's text keys/values;
- swap: image queries of the conditional rows read the clean text keys/values
  (their own image keys/values unchanged); text queries keep the full prompt.
Blocks with nothing to do hand the call to the previously installed processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .processors import RunState, concept_contribution, sdpa_with_lse


class _JointInstrumentation:
    text_first: bool = True

    def __init__(self, inner, block: str, index: int, state: RunState, out_projection):
        self.inner = inner
        self.block = block
        self.index = index
        self.state = state
        self.out_projection = out_projection  # () -> (weight [D, H*d], bias [D] | None)

    def _busy(self) -> bool:
        st = self.state
        swap = st.swap
        in_swap = swap is not None and self.block in swap.blocks
        if st.capturing:
            return in_swap
        return st.active and (st.probe is not None or in_swap)

    def _segments(self, total: int, n_text: int) -> tuple[slice, slice]:
        """(text, image) slices of the joint sequence."""
        if self.text_first:
            return slice(0, n_text), slice(n_text, total)
        return slice(total - n_text, total), slice(0, total - n_text)

    def _instrument(self, q, k, v, n_text: int, attend, lse=None):
        """q, k, v: [B, H, S, d] joint (post-norm, post-rope); lse [B, H, S] from the
        kernel or None. Returns (rows, image_out [n, H, N, d]) when the image outputs
        of the conditional rows must be replaced."""
        st = self.state
        txt, img = self._segments(k.shape[2], n_text)
        if st.capturing:
            st.swap.text_kv[self.block] = (k[:, :, txt], v[:, :, txt])  # [n, H, L, d] of the clean prompts
            return None
        rows = st.adapter.cond_rows(q.shape[0], st.n_images)
        if st.probe is not None:
            probe = st.probe
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
                    variant=probe.variant,
                    lse=None if lse is None else lse[rows][:, :, img],
                )
            probe.records[(self.index, st.step)] = (total, per_head)
        if st.swap is not None and self.block in st.swap.blocks:
            ck, cv = st.swap.text_kv[self.block]
            kr, vr = k[rows], v[rows]
            if self.text_first:
                k2, v2 = torch.cat([ck, kr[:, :, img]], dim=2), torch.cat([cv, vr[:, :, img]], dim=2)
            else:
                k2, v2 = torch.cat([kr[:, :, img], ck], dim=2), torch.cat([vr[:, :, img], cv], dim=2)
            return rows, attend(q[rows][:, :, img], k2, v2)  # [n, H, N, d]
        return None


class FluxJointProcessor(_JointInstrumentation):
    """Mirror of diffusers' `FluxAttnProcessor` (double- and single-stream blocks).
    Layout [B, S, H, d]; text first. Single-stream blocks receive the joint sequence
    as `hidden_states`; its text length comes from the adapter (`state.n_text`)."""

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
        if backend is None and parallel is None and attention_mask is None and self.state.probe is not None:
            # the native backend permutes to [B, H, S, d] and calls F.scaled_dot_product_attention
            out, lse = sdpa_with_lse(query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3))
            out = out.permute(0, 2, 1, 3)  # [B, S, H, d]
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend,
                                        parallel_config=parallel)
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.n_text

        def attend(q, k, v):  # canonical [n, H, S, d] in and out, same kernel
            o = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      backend=backend, parallel_config=parallel)
            return o.transpose(1, 2)

        override = self._instrument(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), n_text, attend,
                                    lse)
        if override is not None:
            rows, image_out = override
            out = out.clone()
            out[rows, n_text:] = image_out.transpose(1, 2).to(out.dtype)
        out = out.flatten(2, 3).to(query.dtype)  # [B, S, H*d]
        if encoder_hidden_states is not None:
            encoder_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            out = attn.to_out[0](out.contiguous())
            out = attn.to_out[1](out)
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return out, encoder_out
        return out


class SD3JointProcessor(_JointInstrumentation):
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
            rows, image_out = override
            out = out.clone()
            out[rows, :, :n_image] = image_out.to(out.dtype)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out, encoder_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out, encoder_out
