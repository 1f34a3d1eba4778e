"""Streaming contributions equal a naive computation from materialized attention maps."""

import copy
import functools
import pytest
import torch

import ditloc
from ditloc.adapters import get_adapter
from ditloc.engine import concept_contribution

from conftest import RUN, f32_rtol

localize_contribution = functools.partial(ditloc.localize, method="contribution")


def naive(q, k, v, pos, mask, w, b, terms):
    """Materialize softmax(q kᵀ/√d + mask) and apply the contribution formula literally, per sample."""
    n, H, N, d = q.shape
    tot, heads = [], []
    for s in range(n):
        logits = q[s].double() @ k[s].double().transpose(-1, -2) / d**0.5  # [H, N, L]
        if mask is not None:
            logits = logits + mask[s].double()
        A = logits.softmax(-1)  # [H, N, L] -- the full map
        A_S = A[:, :, pos[s]]  # [H, N, S]
        if terms == "attn":
            per_head = A_S.norm(dim=-1)  # [H, N]
            total = A_S.permute(1, 0, 2).reshape(N, -1).norm(dim=-1)
        else:
            y = A_S @ v[s].double()[:, pos[s]]  # [H, N, d]
            if terms == "attn_value":
                per_head = y.norm(dim=-1)
                total = y.permute(1, 0, 2).reshape(N, -1).norm(dim=-1)
            else:
                wd = w.double()
                per_head = torch.stack([(y[h] @ wd[:, h * d : (h + 1) * d].T).norm(dim=-1) for h in range(H)])
                z = y.permute(1, 0, 2).reshape(N, -1) @ wd.T
                if b is not None:
                    z = z + b.double()
                total = z.norm(dim=-1)
        tot.append(total.mean())
        heads.append(per_head.mean(-1))
    return torch.stack(tot), torch.stack(heads)


def naive_rtol(q, k, w, pos):
    """`f32_rtol` over the reductions of the contribution formula, which the streaming kernel computes in
    float32: the logits (d), the softmax normalizer (L keys), the concept keys (S), the output projection
    (H x d), its norm (D outputs) and the mean over the N queries."""
    n, H, N, d = q.shape
    return f32_rtol(d, k.shape[2], max(len(p) for p in pos), H * d, w.shape[0], N)


@pytest.mark.parametrize("terms", ["attn", "attn_value", "attn_value_out"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 22, 97])  # one chunk; many ragged chunks
@pytest.mark.parametrize("key_limit", [None, 11])  # keys 11..14 are padding in every row
def test_kernel_matches_naive(terms, with_bias, chunk_elements, key_limit):
    g = torch.Generator().manual_seed(0)
    n, H, N, L, d, D = 3, 4, 37, 15, 8, 24
    q = torch.randn(n, H, N, d, generator=g)
    k = torch.randn(n, H, L, d, generator=g)
    v = torch.randn(n, H, L, d, generator=g)
    w, b = torch.randn(D, H * d, generator=g), torch.randn(D, generator=g)
    lens = [11, 6, 8]  # padded text: at most 11 real keys
    mask = torch.zeros(n, H, 1, L)
    for s, m in enumerate(lens):
        mask[s, :, :, m:] = -10000.0
    pos_lists = [[2, 3], [0], [5, 6, 7]]
    pos = torch.zeros(n, 3, dtype=torch.long)
    valid = torch.zeros(n, 3, dtype=torch.bool)
    for s, p in enumerate(pos_lists):
        pos[s, : len(p)] = torch.tensor(p)
        valid[s, : len(p)] = True
    got_t, got_h = concept_contribution(
        q, k, v, pos, valid, mask=mask, out_weight=w, out_bias=b if with_bias else None,
        terms=terms, chunk_elements=chunk_elements, key_limit=key_limit,
    )
    want_t, want_h = naive(q, k, v, pos_lists, mask, w, b if with_bias else None, terms)
    tol = naive_rtol(q, k, w, pos_lists)
    torch.testing.assert_close(got_t.double(), want_t, rtol=tol, atol=0)
    torch.testing.assert_close(got_h.double(), want_h, rtol=tol, atol=0)


def _capture_attn2_inputs(pipe):
    """Forward pre-hooks recording what every attn2 receives, in call order."""
    adapter = get_adapter(pipe)
    calls, handles = [], []
    for i, name in enumerate(adapter.block_names()):
        attn = adapter.text_attention(name)

        def hook(module, args, kwargs, i=i):
            hs = args[0] if args else kwargs["hidden_states"]
            calls.append((i, hs.detach().clone(), kwargs["encoder_hidden_states"].detach().clone(),
                          kwargs.get("attention_mask")))
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    return adapter, calls, handles


def _naive_from_inputs(adapter, calls, positions, n, qk_before, terms, out_bias):
    """C(b, t, p) recomputed from the captured module inputs with full maps."""
    n_blocks = len(adapter.block_names())
    out = {}
    for call_index, (i, hs, ehs, mask) in enumerate(calls):
        step = call_index // n_blocks
        attn = adapter.text_attention(adapter.block_names()[i])
        B = hs.shape[0]
        rows = adapter.cond_rows(B, n)
        q, k, v = attn.to_q(hs), attn.to_k(ehs), attn.to_v(ehs)
        if qk_before and attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        H = attn.heads
        d = k.shape[-1] // H
        split = lambda x: x.view(B, -1, H, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if not qk_before and attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        bias = None if mask is None else mask[:, None]  # [B, 1, 1, L]
        proj = attn.to_out[0]
        t, h = naive(q[rows], k[rows], v[rows], positions, None if bias is None else bias[rows],
                     proj.weight, proj.bias if out_bias else None, terms)
        out[(i, step)] = (t, h, naive_rtol(q, k, proj.weight, positions))
    return out


@pytest.mark.parametrize("terms", ["attn", "attn_value", "attn_value_out"])
@pytest.mark.parametrize("out_bias", [False, True])
def test_localize_matches_naive_maps(any_pipe, terms, out_bias):
    pipe = any_pipe
    prompts = ["a photo of van gogh", "van gogh painting of a dog in the city at night", "the van gogh, the van gogh"]
    adapter, calls, handles = _capture_attn2_inputs(pipe)
    try:
        loc = localize_contribution(pipe, prompts, "Van Gogh", contribution_terms=terms, out_bias=out_bias,
                                    guidance_scale=4.5, **RUN)
    finally:
        for h in handles:
            h.remove()
    positions = [list(s.positions) for s in loc.spans]
    assert [len(p) for p in positions] == [2, 2, 4]
    want = _naive_from_inputs(adapter, calls, positions, len(prompts), adapter.qk_norm_before_split, terms, out_bias)
    n_blocks, n_steps = len(loc.blocks), RUN["num_inference_steps"]
    assert loc.per_sample_step.shape == (n_blocks, n_steps, len(prompts))
    for (b, t), (tot, heads, tol) in want.items():
        torch.testing.assert_close(loc.per_sample_step[b, t].double(), tot, rtol=tol, atol=0)
        torch.testing.assert_close(loc.per_head_step[b, t].double(), heads, rtol=tol, atol=0)


def test_padding_mask_is_respected(pixart):
    """Without the mask the softmax would spread over padding; with it, results match the masked naive map."""
    adapter, calls, handles = _capture_attn2_inputs(pixart)
    try:
        localize_contribution(pixart, ["a photo of van gogh"], "van gogh", **RUN)
    finally:
        for h in handles:
            h.remove()
    mask = calls[0][3]
    assert mask is not None and (mask < -1000).any(), "padding must be masked in attn2"


def test_unconditional_half_not_measured(pixart):
    """CFG batch [uncond, cond]: scores come from the conditional half only, so they do not
    depend on the negative prompt's contents."""
    pipe = copy.deepcopy(pixart).to(torch.float64)  # the rows' rounding independent of their neighbours'
    a = localize_contribution(pipe, ["a photo of van gogh"], "van gogh", **RUN)
    b = localize_contribution(pipe, ["a photo of van gogh"], "van gogh", negative_prompt="a dog", **RUN)
    # The trajectories differ (CFG mixes both halves), so scores differ from step 1 on,
    # but at step 0 the conditional half's inputs are identical.
    assert torch.equal(a.per_sample_step[:, 0], b.per_sample_step[:, 0])
    assert not torch.allclose(a.per_sample_step[:, 1:], b.per_sample_step[:, 1:])


def test_no_guidance_batch(pixart):
    loc = localize_contribution(pixart, ["a photo of van gogh"], "van gogh", guidance_scale=1.0, **RUN)
    assert loc.per_sample_step.shape[2] == 1 and torch.isfinite(loc.scores).all()


def test_kernel_concept_beyond_key_limit():
    """A concept position past the key limit (a caller's inconsistent limit) takes the slow
    path and still matches the naive map (such a key is masked: it contributes ~0)."""
    g = torch.Generator().manual_seed(1)
    n, H, N, L, d, D = 2, 2, 9, 10, 4, 6
    q, k, v = (torch.randn(n, H, x, d, generator=g) for x in (N, L, L))
    w = torch.randn(D, H * d, generator=g)
    mask = torch.zeros(n, H, 1, L)
    mask[..., 6:] = -10000.0
    pos = torch.tensor([[2, 7], [5, 8]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    got_t, got_h = concept_contribution(q, k, v, pos, valid, mask=mask, out_weight=w, key_limit=6)
    want_t, want_h = naive(q, k, v, pos.tolist(), mask, w, None, "attn_value_out")
    tol = naive_rtol(q, k, w, pos.tolist())
    torch.testing.assert_close(got_t.double(), want_t, rtol=tol, atol=1e-9)
    torch.testing.assert_close(got_h.double(), want_h, rtol=tol, atol=1e-9)


@pytest.mark.parametrize("terms", ["attn", "attn_value", "attn_value_out"])
def test_kernel_with_precomputed_normalizer(terms):
    """With the softmax normalizer from the attention kernel (sdpa_with_lse), only the concept keys are touched."""
    from ditloc.engine import sdpa_with_lse

    g = torch.Generator().manual_seed(2)
    n, H, N, L, d, D = 2, 3, 21, 13, 8, 12
    q, k, v = (torch.randn(n, H, x, d, generator=g) for x in (N, L, L))
    w = torch.randn(D, H * d, generator=g)
    pos = torch.tensor([[1, 4], [7, 7]])
    valid = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        out, lse = sdpa_with_lse(q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert lse is not None and lse.shape == (n, H, N)  # CPU: the flash kernel's own normalizer
    got_t, got_h = concept_contribution(q, k, v, pos, valid, out_weight=w, terms=terms, lse=lse)
    want_t, want_h = naive(q, k, v, [[1, 4], [7]], None, w, None, terms)
    tol = naive_rtol(q, k, w, [[1, 4], [7]])
    torch.testing.assert_close(got_t.double(), want_t, rtol=tol, atol=0)
    torch.testing.assert_close(got_h.double(), want_h, rtol=tol, atol=0)
