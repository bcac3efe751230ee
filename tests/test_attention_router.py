"""The `attention` router (A-MoD) and the attention probe it reads from."""

from __future__ import annotations

import copy

import pytest
import torch

import modadapt
from modadapt.adapters.timm import create_model
from modadapt.attention_probe import PROBE_ATTENTION, attention_blocks, column_mean_attention
from modadapt.errors import ModAdaptError
from modadapt.metrics.arank import probe
from modadapt.metrics.measured_flops import measured_flops
from modadapt.routers.attention import attention_router_flops

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vit():
    torch.manual_seed(0)
    return create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5
    ).eval()


def capture_scores(model):
    """Wrap each MoD layer's router.score to keep what it returned."""
    scores = {}
    for layer in modadapt.mod_layers(model):
        router, index = layer.router, layer.mod_state.index

        def score(hidden, ctx, _orig=router.score, _i=index):
            out = _orig(hidden, ctx)
            scores[_i] = out
            return out

        router.score = score
    return scores


def explicit(q, k, allowed):
    """Full softmax map with a [B?, 1, Tq, Tk] bool mask, float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


def test_vit_scores_equal_explicit_attention_map():
    model = vit()
    maps = {}
    for i, block in enumerate(model.blocks):  # the eager path materialises the softmax map
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, out, _i=i: maps.__setitem__(_i, out))
    modadapt.convert(model, router="attention", capacity=0.25, layers="every-other")
    scores = capture_scores(model)
    with torch.no_grad():
        model(IMAGES)
    for layer in modadapt.mod_layers(model):
        i = layer.mod_state.index
        expected = maps[i - 1].mean(dim=(1, 2))  # column mean over heads and queries
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-6)
        keep = layer.mod_state.last_keep
        top = expected[:, 1:].topk(int(keep[0, 1:].sum()), dim=1).indices + 1
        assert keep[:, 0].all() and torch.equal(keep[:, 1:].sum(1), keep[:, 1:].gather(1, top - 1).sum(1))
        assert keep.gather(1, top).all()


def test_column_mean_chunking_masks_and_gqa():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding in row 1
    k_full = k.repeat_interleave(2, dim=1)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    allowed = (causal[None] & valid[:, None, :] & valid[:, :, None])[:, None]
    probs = explicit(q, k_full, allowed)
    expected = probs.sum(dim=(1, 2)) / 4 / allowed[:, 0].sum(1).clamp_min(1)
    for chunk in (1, 4, 100):
        got = column_mean_attention(q, k, scale=8**-0.5, causal=True, valid=valid, chunk=chunk)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        blocks = torch.cat([p for _, p in attention_blocks(q, k, scale=8**-0.5, causal=False, chunk=chunk)], 2)
        torch.testing.assert_close(blocks.double(), explicit(q, k_full, torch.ones(1, 1, 9, 9, dtype=torch.bool)))
    # decode layout: 2 queries at the end of 9 keys see keys up to their own positions
    got = column_mean_attention(q[:, :, -2:], k, scale=8**-0.5, causal=True, chunk=1)
    tail = explicit(q[:, :, -2:], k_full, causal[None, None, -2:])
    torch.testing.assert_close(got.double(), tail.sum(dim=(1, 2)) / 4 / causal[-2:].sum(0).clamp_min(1))


def llama(attn="sdpa"):
    model = modadapt.build_preset("tiny-llama")
    model.config._attn_implementation = attn
    return model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma2"])
def test_llm_scores_equal_explicit_causal_statistic(preset):
    """Against the maps eager attention materialises; Gemma 2 runs (and is probed with) eager
    attention with soft-capped scores, and layer 0 has a sliding window of 4."""
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))

    def build():
        model = modadapt.build_preset(preset)
        for module in model.modules():
            if getattr(module, "attn_logit_softcapping", None):
                module.attn_logit_softcapping = 0.02  # a cap tiny random scores reach
        return model

    eager = build()
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = eager(ids, output_attentions=True).attentions
    model = build()
    observed = model.config._attn_implementation
    modadapt.convert(model, router="attention", capacity=0.5, layers="every-other")
    scores = capture_scores(model)
    with torch.no_grad():
        model(ids)
    # layer 1 reads layer 0, whose inputs equal the dense model's (later layers see MoD outputs)
    positions = torch.arange(12)
    own = attentions[0][:, :, positions, positions].mean(1)  # each token's attention to itself
    window = getattr(model.config, "sliding_window", None) if getattr(model.config, "layer_types", None) else None
    visible = positions + 1 if window is None else (positions + 1).clamp(max=window)
    torch.testing.assert_close(scores[1], own * visible, rtol=1e-4, atol=1e-5)
    modadapt.unload(model)
    assert model.config._attn_implementation == observed


def test_llm_cached_generation_equals_full_forward_with_padding():
    model = llama()
    modadapt.convert(model, router="attention", capacity=0.5, layers="every-other")
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(out.sequences, attention_mask=full_mask, position_ids=positions).logits[:, 7:-1]
        kept = [layer.mod_state.last_keep[1] for layer in modadapt.mod_layers(model)]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=1e-4, rtol=1e-4)
    assert any(0 < k.sum() < k.numel() for k in kept)  # the causal rule really skipped tokens
    # the padded row decides as it would alone
    with torch.no_grad():
        alone = model(out.sequences[:1, 3:]).logits[:, 4:-1]
    torch.testing.assert_close(alone, full[:1], atol=1e-4, rtol=1e-4)


def test_llm_training_topk_and_gradients():
    model = llama().train()
    modadapt.convert(model, router="attention", capacity=0.25, layers="every-other")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    for row in modadapt.routing_stats(model):
        assert row["kept_tokens"] == 2 * 4
    assert all(p.grad is not None for p in model.model.layers[1].parameters())


def test_llm_causal_rule_is_calibrated_by_training():
    """Before training the causal cut-off is 1.0; training steps record the top-k boundary, after
    which evaluation keeps about the capacity (the fixed 1.0 kept ~96 % on a real LM)."""
    model = llama()
    modadapt.convert(model, router="attention", capacity=0.25, layers="every-other")
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(6))
    routers = [layer.router for layer in modadapt.mod_layers(model)]
    model.eval()
    with torch.no_grad():
        model(ids)
        scores = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
    assert all(int(r.calibration_steps) == 0 for r in routers)
    model.train()
    model(ids, labels=ids)  # a training forward (no step needed: the router has no parameters)
    model.eval()
    with torch.no_grad():
        model(ids)
    for router, layer, before in zip(routers, modadapt.mod_layers(model), scores):
        assert int(router.calibration_steps) == 1
        kept = layer.mod_state.last_keep.float().mean().item()
        assert abs(kept - 0.25) < 0.1 and kept != before.float().mean().item()
    fixed = llama()
    modadapt.convert(fixed, router="attention", capacity=0.25, layers="every-other", router_kwargs={"threshold": 1.0})
    fixed.train()
    fixed(ids, labels=ids)  # recorded, but a given threshold wins
    router = modadapt.mod_layers(fixed)[0].router
    assert int(router.calibration_steps) == 1 and router.causal_threshold(router.layer_index) == 1.0


def test_placement_and_attention_kernel_errors():
    model = llama()
    with pytest.raises(ModAdaptError, match="layer 1 must stay dense"):
        modadapt.convert(model, router="attention", layers="1,2")
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_modadapt_state")
    with pytest.raises(ModAdaptError, match="attn_implementation='sdpa'"):
        modadapt.convert(llama("flex_attention"), router="attention")
    modadapt.convert(model, router="attention")
    assert model.config._attn_implementation == PROBE_ATTENTION
    twin = copy.deepcopy(model)
    modadapt.unload(twin)  # unloading a copy leaves the original routing
    assert twin.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == PROBE_ATTENTION
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 6)))
    modadapt.unload(model)
    assert model.config._attn_implementation == "sdpa"


def test_probe_on_a_dense_model_leaves_outputs_unchanged():
    model = llama()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(ids).logits
        with probe(model, [0, 2]) as watched:
            during = model(ids).logits
        rec = watched.layers, model.config._attn_implementation
    assert rec == ([0, 2], "sdpa")
    assert torch.equal(before, during)


def test_flops_counted():
    assert attention_router_flops(2, 17, 17, 2, 16) == 2 * 2 * 17 * 17 * (2 * 16 + 6)
    dense = vit()
    x = IMAGES[:1]
    base = measured_flops(dense, x)
    modadapt.convert(dense, router="attention", capacity=0.25, layers="every-other")
    mod = measured_flops(dense, x)
    assert base["router"] == 0 and base["attention"] == 4 * 4 * 2 * 17 * 17 * 16
    assert mod["router"] == 2 * attention_router_flops(1, 17, 17, 2, 16)
    assert mod["matmul"] < base["matmul"] and mod["total"] < base["total"]
    assert mod["total"] == mod["matmul"] + mod["attention"] + mod["router"]
    control = vit()  # the same kept tokens without the router's recomputation: same matmul FLOPs
    modadapt.convert(control, router="random", capacity=0.25, layers="every-other")
    assert measured_flops(control, x)["matmul"] == mod["matmul"]
