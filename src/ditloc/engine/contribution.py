"""The contribution math, for any attention layout.

The contribution of a concept's text tokens S to image token i:

    o_i = W_o · concat_heads( Σ_{j∈S} A_ij v_j )          C = mean_i ‖o_i‖₂

is computed while the attention runs, without materializing attention maps:
A_iS needs only the logits of the |S| concept columns and each row's softmax
normalizer (logsumexp over all keys), evaluated in query chunks of bounded size.
The block's own output still comes from the fused kernel.
"""

from __future__ import annotations

import torch

#: which terms of the attention output the contribution measures: the attention weights alone, times the
#: values, or times the values and the output projection
CONTRIBUTION_TERMS = ("attn", "attn_value", "attn_value_out")

#: upper bound on the elements of one transient chunk tensor in the measurement
CHUNK_ELEMENTS = 1 << 22


def chunk_elements_for(device: torch.device) -> int:
    """The chunk bound for `device`: `CHUNK_ELEMENTS` on the CPU (cache-sized); on an
    accelerator 1/256 of its memory in float32 elements, between 4M and 256M (a few
    large kernels instead of many small ones). Host-side, cached."""
    device = torch.device(device)
    if device.type == "cpu":
        return CHUNK_ELEMENTS
    key = (device.type, device.index)
    if key not in _CHUNKS:
        total = None
        try:
            module = torch.get_device_module(device.type)
            total = module.get_device_properties(device.index or 0).total_memory
        except (AttributeError, RuntimeError, AssertionError, TypeError):
            try:
                total = torch.mps.recommended_max_memory() if device.type == "mps" else None
            except (AttributeError, RuntimeError):
                total = None
        elements = (total // 256 // 4) if total else 1 << 24
        _CHUNKS[key] = int(min(max(elements, CHUNK_ELEMENTS), 1 << 28))
    return _CHUNKS[key]


_CHUNKS: dict[tuple, int] = {}


def concept_contribution(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    mask: torch.Tensor | None = None,
    out_weight: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    terms: str = "attn_value_out",
    scale: float | None = None,
    key_limit: int | None = None,
    lse: torch.Tensor | None = None,
    chunk_elements: int | None = None,
    max_position: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over image queries of the concept's contribution, total and per head.

    query [n, H, N, d]; key, value [n, H, L, d]; positions/valid [n, S] (concept
    key indices per sample, padded); mask: additive bias broadcastable to
    [n, H, N, L] or None; out_weight [D, H*d], out_bias [D] (attn_value_out only; on any device,
    e.g. where offloading keeps them: they are moved to `query`'s).
    `key_limit`: keys at and after it are masked in every row (text padding), so
    they add exactly 0 to the softmax normalizer and are skipped. `lse` [n, H, N]:
    each row's softmax normalizer when the attention kernel already computed it;
    then only the |S| concept keys are touched. `max_position`: the largest entry of
    `positions`, known on the host (`Probe.max_position`); without it it is read from
    `positions`, which synchronises when they live on an accelerator.
    `chunk_elements`: bound on a transient chunk (default `chunk_elements_for` the device).
    Nothing else here reads a tensor value on the host.
    Returns total [n] and per_head [n, H] (float32). Per-head values of
    `attn_value_out` are ‖W_o[:, head] y_head‖ and never include the bias.

    Cost: the normalizer needs q·k over the L_eff unpadded keys (nothing when `lse`
    is given); everything else
    involves only the |S| concept keys. The output projection is applied to the
    concept's values once (u_j = W_h v_j, [n, H, S, D]) instead of to every query's
    output, so o_i = Σ_hj A_ij u_j costs N·H·S·D rather than N·(H·d)·D.
    """
    if terms not in CONTRIBUTION_TERMS:
        raise ValueError(f"terms must be one of {CONTRIBUTION_TERMS}, got {terms!r}")
    n, H, N, d = query.shape
    L = key.shape[2] if key_limit is None else max(1, min(int(key_limit), key.shape[2]))
    S = positions.shape[1]
    scale = d**-0.5 if scale is None else scale
    f32 = torch.float32
    pos = positions.to(query.device)  # [n, S] (a no-op for a probe already on the device)
    keep = valid.to(device=query.device, dtype=f32)[:, None, None, :]  # [n, 1, 1, S]
    idx = pos[:, None, :, None].expand(n, H, S, d)
    k_all = key[:, :, :L].to(f32) if lse is None else None  # [n, H, L_eff, d]; not needed with the kernel's normalizer
    v_s = value.gather(2, idx).to(f32)  # [n, H, S, d]
    # Without a kernel normalizer we need the logits over the unpadded keys anyway, and
    # concept keys are never padding: gather their columns from those logits (one
    # matmul per chunk) unless a caller's limit cut them off.
    if lse is None and max_position is None:
        max_position = int(positions.max())
    from_logits = lse is None and max_position < L
    if not from_logits:
        k_s = key.gather(2, idx).to(f32)  # [n, H, S, d]
    if mask is not None:
        mask = mask.to(f32)
        if not from_logits:
            mask_s = mask.expand(n, H, mask.shape[-2], mask.shape[-1]).gather(
                -1, pos[:, None, None, :].expand(n, H, mask.shape[-2], S)
            )  # [n, H, 1|N, S]
        mask = mask[..., :L]  # [n, H|1, 1|N, L_eff]
    if terms == "attn_value_out":
        w_heads = out_weight.to(device=query.device, dtype=f32).view(out_weight.shape[0], H, d)  # [D, H, d]
        u = torch.einsum("nhsd,Dhd->nhsD", v_s, w_heads)  # [n, H, S, D]: W_h v_j
        gram = u @ u.transpose(-1, -2)  # [n, H, S, S]: ‖Σ_j a_j u_j‖² = aᵀ G a
        u_cat = u.reshape(n, H * S, -1)  # [n, H*S, D]
        b = out_bias.to(device=query.device, dtype=f32) if out_bias is not None else None

    total = query.new_zeros(n, dtype=f32)
    per_head = query.new_zeros(n, H, dtype=f32)
    width = max(S, d) if lse is not None else max(L, S, d)
    if chunk_elements is None:
        chunk_elements = chunk_elements_for(query.device)
    chunk = max(1, chunk_elements // max(1, n * H * width))
    for start in range(0, N, chunk):
        q = query[:, :, start : start + chunk].to(f32)  # [n, H, c, d]
        c = q.shape[2]
        rows = slice(start, start + chunk) if mask is not None and mask.shape[-2] > 1 else slice(None)
        if from_logits:
            logits = (q @ k_all.transpose(-1, -2)) * scale  # [n, H, c, L_eff] (transient)
            if mask is not None:
                logits = logits + mask[:, :, rows]
            logit_s = logits.gather(-1, pos[:, None, None, :].expand(n, H, c, S))  # [n, H, c, S]
        else:
            logit_s = (q @ k_s.transpose(-1, -2)) * scale  # [n, H, c, S]
            if mask is not None:
                logit_s = logit_s + mask_s[:, :, rows]
        if lse is not None:
            norm = lse[:, :, start : start + chunk, None].to(f32)  # [n, H, c, 1] from the kernel
        else:
            if not from_logits:
                logits = (q @ k_all.transpose(-1, -2)) * scale
                if mask is not None:
                    logits = logits + mask[:, :, rows]
            norm = logits.logsumexp(-1, keepdim=True)  # [n, H, c, 1]: the row's softmax normalizer
            del logits
        a = (logit_s - norm).exp() * keep  # [n, H, c, S]: A_iS
        if terms == "attn":
            head_sq = (a * a).sum(-1)  # [n, H, c]
            tot = head_sq.sum(1).sqrt()  # [n, c]
        elif terms == "attn_value":
            y = a @ v_s  # [n, H, c, d]
            head_sq = (y * y).sum(-1)  # [n, H, c]
            tot = head_sq.sum(1).sqrt()  # [n, c]
        else:
            head_sq = torch.einsum("nhcs,nhst,nhct->nhc", a, gram, a).clamp_min(0)  # [n, H, c]
            z = a.transpose(1, 2).reshape(n, c, H * S) @ u_cat  # [n, c, D]: W_o concat_h(y_h)
            if b is not None:
                z = z + b
            tot = z.norm(dim=-1)  # [n, c]
        total += tot.sum(-1)
        per_head += head_sq.sqrt().sum(-1)
    return total / N, per_head / N
