"""Masks of MoD layers: every shortcut (None = the kernel's own default) equals the explicit mask."""

import pytest
import torch
import torch.nn.functional as F

from modadapt.masks import subset_attention_mask


def explicit(query_index, query_valid, past_index, past_valid, window):
    """The rule, written out slowly: real keys at or before the query (within the window), plus itself."""
    B, K = query_index.shape
    keys = query_index if past_index is None else torch.cat([past_index, query_index], 1)
    if query_valid is None:
        query_valid = torch.ones_like(query_index, dtype=torch.bool)
    valid = (
        query_valid
        if past_index is None
        else torch.cat(
            [past_valid if past_valid is not None else torch.ones_like(past_index, dtype=torch.bool), query_valid], 1
        )
    )
    P = keys.shape[1] - K
    out = torch.zeros(B, 1, K, keys.shape[1], dtype=torch.bool)
    for b in range(B):
        for q in range(K):
            for j in range(keys.shape[1]):
                ok = bool(valid[b, j]) and keys[b, j] <= query_index[b, q]
                if window is not None:
                    ok = ok and keys[b, j] > query_index[b, q] - window
                out[b, 0, q, j] = ok or j == P + q
    return out


def attend(mask, K, P, B=2, H=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, K, d, generator=g)
    k = torch.randn(B, H, P + K, d, generator=g)
    v = torch.randn(B, H, P + K, d, generator=g)
    if mask is None:  # what transformers' SDPA integration does with no mask
        if K > 1:
            return F.scaled_dot_product_attention(q, k[:, :, :K], v[:, :, :K], is_causal=True) if P == 0 else None
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "case",
    ["prefill", "prefill-fillers", "decode-all-valid", "decode-past-fillers", "chunk-with-past", "window"],
)
def test_shortcuts_equal_explicit_rule(impl, case):
    g = torch.Generator().manual_seed(1)
    B = 2
    past_index = past_valid = query_valid = None
    window = None
    if case.startswith("prefill") or case == "window":
        query_index = torch.sort(torch.randperm(12, generator=g)[:6]).values.expand(B, 6).clone()
        if case == "prefill-fillers":
            query_valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
        if case == "window":
            window = 4
    else:
        past_index = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
        if case == "decode-past-fillers":
            past_valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
        query_index = torch.tensor([[8], [8]]) if case.startswith("decode") else torch.tensor([[8, 10], [9, 11]])
    mask = subset_attention_mask(
        impl,
        query_index=query_index,
        query_valid=query_valid,
        past_index=past_index,
        past_valid=past_valid,
        causal=True,
        window=window,
        span=12,
        dtype=torch.float32,
    )
    want = explicit(query_index, query_valid, past_index, past_valid, window)
    K, P = query_index.shape[1], 0 if past_index is None else past_index.shape[1]
    if mask is None:
        assert impl == "sdpa" or K == 1
        torch.testing.assert_close(attend(None, K, P), attend(want, K, P))
    elif impl == "eager":
        assert torch.equal(mask == 0, want)
    else:
        assert torch.equal(mask, want)
    if case in ("prefill", "decode-all-valid") and impl == "sdpa":
        assert mask is None  # the fused paths are taken where they are correct


def test_window_forces_explicit_mask_only_when_it_cuts():
    q = torch.arange(6).expand(1, 6)
    kwargs = dict(query_valid=None, past_index=None, past_valid=None, causal=True, dtype=torch.float32)
    assert subset_attention_mask("sdpa", query_index=q, window=8, span=6, **kwargs) is None
    assert subset_attention_mask("sdpa", query_index=q, window=4, span=6, **kwargs) is not None


def test_unsupported_kernel_is_a_clear_error():
    from modadapt import ModAdaptError

    with pytest.raises(ModAdaptError, match="attn_implementation"):
        subset_attention_mask(
            "flash_attention_2",
            query_index=torch.zeros(1, 1, dtype=torch.long),
            query_valid=None,
            past_index=None,
            past_valid=None,
            causal=True,
            window=None,
            span=1,
            dtype=torch.float32,
        )
