"""timm ViT adapter: prefix tokens, capacity 1.0, timm entry points, compile, checkpointing, persistence."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import modadapt
from modadapt.adapters.timm import create_model
from modadapt.errors import ModAdaptError

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def small(name: str = "vit_tiny_patch16_224", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**SMALL, **extra}).eval()


def randomize(model, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(3)
    for layer in modadapt.mod_layers(model):
        for param in layer.router.parameters():
            param.data = torch.randn(param.shape, generator=generator) * scale


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "name, extra, prefix, router",
    [
        ("deit_tiny_distilled_patch16_224", {}, 2, "attention"),  # class + distillation token
        ("vit_tiny_patch16_224", {"reg_tokens": 3}, 4, "topk"),  # class + 3 registers
        ("deit3_small_patch16_224", {"init_values": 1e-2}, 1, "random"),  # LayerScale
    ],
)
def test_prefix_tokens_always_kept(name, extra, prefix, router):
    model = small(name, **extra)
    assert model.num_prefix_tokens == prefix
    modadapt.convert(model, router=router, capacity=0.1, layers="every-other")
    randomize(model)
    for mode in (model.train, model.eval):
        mode()
        model(IMAGES)
        for layer in modadapt.mod_layers(model):
            keep = layer.mod_state.last_keep
            assert keep[:, :prefix].all()
            # 16 patches at capacity 0.1: exactly ceil(0.1 * 16 ...) patch tokens, far fewer than all
            assert 0 < keep[:, prefix:].sum(1).max() <= 3


@pytest.mark.parametrize("router", ["topk", "random", "attention"])
def test_capacity_one_equals_dense(router):
    model = small("deit3_small_patch16_224", init_values=0.1)
    with torch.no_grad():
        dense = model(IMAGES)
    modadapt.convert(model, router=router, capacity=1.0, layers="every-other")
    randomize(model)
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            torch.testing.assert_close(model(IMAGES), dense, rtol=0, atol=1e-6)


def test_skipped_tokens_untouched_and_eval_keeps_capacity():
    model = small()
    modadapt.convert(model, router="topk", capacity=0.25, layers="every-other")
    randomize(model)
    layer = modadapt.mod_layers(model)[0]
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(IMAGES)  # eval mode: a ViT keeps its top-k at capacity (no causal rule)
    handle.remove()
    keep = layer.mod_state.last_keep
    # the class token + the framework's top-k share of the 16 patches, as in training
    model.train()
    model(IMAGES)
    train_counts = layer.mod_state.last_keep.sum(1)
    model.eval()
    assert torch.equal(keep.sum(1), train_counts) and bool((train_counts <= 1 + math.ceil(0.25 * 17)).all())
    assert torch.equal(seen["x"][~keep], seen["y"][~keep])
    assert not torch.equal(seen["x"][keep], seen["y"][keep])


@pytest.mark.parametrize("router", ["topk", "attention"])
def test_forward_features_head_checkpointing_compile(router):
    model = small()
    modadapt.convert(model, router=router, capacity=0.5, layers="every-other")
    randomize(model, 0.3)
    with torch.no_grad():
        logits = model(IMAGES)
        feats = model.forward_features(IMAGES)
        torch.testing.assert_close(model.forward_head(feats), logits)
        assert modadapt.mod_layers(model)[0].mod_state.last_keep[:, 0].all()
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(IMAGES), logits)

    model.train()
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(0)
        model(IMAGES).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_save_load_unload(tmp_path):
    model = small("deit3_small_patch16_224", init_values=0.1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    modadapt.convert(model, router="topk", capacity=0.5, layers="every-other")
    randomize(model)
    with torch.no_grad():
        expected = model(IMAGES)
    modadapt.save(model, tmp_path / "vit")
    loaded = modadapt.load(tmp_path / "vit")
    assert type(loaded).__name__ == "VisionTransformer"
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), expected)
    modadapt.unload(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_save_plain_timm_model_reads_its_arguments(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3, reg_tokens=1).eval()
    modadapt.convert(model, router="attention", capacity=0.5)
    with torch.no_grad():
        expected = model(IMAGES)
    modadapt.save(model, tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(modadapt.load(tmp_path / "plain")(IMAGES), expected)


def test_unload_removes_probe_hooks():
    model = small()
    modadapt.convert(model, router="attention", capacity=0.5)
    assert model.blocks[0].attn.qkv._forward_hooks
    modadapt.unload(model)
    assert not model.blocks[0].attn.qkv._forward_hooks


def test_preset_and_copies_route_independently():
    model = modadapt.build_preset("tiny-vit")
    modadapt.convert(model, router="attention", capacity=0.5)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model)
    ours, theirs = modadapt.mod_layers(model)[0].router.probe, modadapt.mod_layers(twin)[0].router.probe
    assert ours is not theirs
    with torch.no_grad():
        model(y)  # fills only the original's probe
        torch.testing.assert_close(twin(x), expected)
    assert theirs.records[0].q.shape[0] == 2 and not torch.equal(theirs.records[0].q, ours.records[0].q)
    with pytest.raises(ModAdaptError, match="already converted"):
        modadapt.convert(model, router="topk")
