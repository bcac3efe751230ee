"""`modadapt.dense(model)`: the dense original on the same weights, routing restored on exit."""

from __future__ import annotations

import copy

import pytest
import torch

import modadapt
from modadapt.adapters.hf.versions import returned_cache


def routed(tiny, randomize_routers, name="llama"):
    model = modadapt.convert(tiny(name), router="threshold-p", layers="all-but-first")
    return randomize_routers(model)


def test_outputs_equal_the_unloaded_model(tiny, ids, randomize_routers, core_family):
    model = routed(tiny, randomize_routers, core_family)
    reference = modadapt.unload(copy.deepcopy(model))
    x = ids(2, 12)
    with torch.no_grad():
        before = model(x).logits
        with modadapt.dense(model) as same:
            assert same is model
            inside = model(x).logits
        after = model(x).logits
        expected = reference(x).logits
    assert torch.equal(inside, expected)
    assert not torch.equal(before, expected)  # routing really skipped tokens
    assert torch.equal(after, before)


@pytest.mark.parametrize(("kind", "scope"), [("llama", "attention"), ("llama", "mlp"), ("olmo2", "attention")])
def test_a_routed_sublayer_runs_dense_too(kind, scope, tiny, ids, randomize_routers):
    """With `scope` 'attention' / 'mlp' the sublayer runs its original forward, and a post-norm
    layer's norm (OLMo 2), which applies the gate when routing, leaves its output as it is."""
    model = randomize_routers(modadapt.convert(tiny(kind), router="threshold-p", layers="all-but-first", scope=scope))
    reference = modadapt.unload(copy.deepcopy(model))
    x = ids(2, 12)
    with torch.no_grad():
        before = model(x).logits
        with modadapt.dense(model):
            inside = model(x).logits
        assert torch.equal(model(x).logits, before)
        expected = reference(x).logits
    assert torch.equal(inside, expected)
    assert not torch.equal(before, expected)


def test_a_vit_runs_dense_too():
    model = modadapt.convert(modadapt.build_preset("tiny-vit"), router="random", capacity=0.25)
    reference = modadapt.unload(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), modadapt.dense(model):
        assert torch.equal(model(x), reference(x))


def test_generation_with_cache_inside_dense(tiny, ids, randomize_routers):
    model = routed(tiny, randomize_routers)
    reference = modadapt.unload(copy.deepcopy(model))
    prompt = ids(2, 6)
    options = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with modadapt.dense(model):
            out = model.generate(prompt, **options)
            full = model(out.sequences).logits
        expected = reference.generate(prompt, **options)
    assert torch.equal(out.sequences, expected.sequences)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, prompt.shape[1] - 1 + step], rtol=0, atol=1e-5)
    assert not any(hasattr(layer, "mod_seen") for layer in returned_cache(out).layers)  # no MoD bookkeeping


def test_gradients_flow_to_base_weights_not_routers(tiny, ids, randomize_routers):
    model = routed(tiny, randomize_routers).train()
    reference = modadapt.unload(copy.deepcopy(model)).train()
    x = ids(2, 12)
    with modadapt.dense(model):
        out = model(x, labels=x)
    out.loss.backward()
    reference(x, labels=x).loss.backward()
    assert out.get("router_aux_loss") is None
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if ".router." in name:
            assert param.grad is None, name
        else:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-7)


def test_routing_is_restored_after_an_exception_and_when_nested(tiny, ids, randomize_routers):
    model = routed(tiny, randomize_routers)
    x = ids(2, 12)
    with torch.no_grad():
        before = model(x).logits
        with pytest.raises(RuntimeError, match="boom"), modadapt.dense(model):
            raise RuntimeError("boom")
        assert torch.equal(model(x).logits, before)
        with modadapt.dense(model):
            with modadapt.dense(model):
                pass
            dense_inside = model(x).logits  # still dense after the inner block
        assert not torch.equal(dense_inside, before)
        assert torch.equal(model(x).logits, before)


def test_dense_needs_a_converted_model(tiny):
    with pytest.raises(modadapt.ModAdaptError, match="not converted"):
        with modadapt.dense(tiny("llama")):
            pass


def test_graphed_decoder_refuses_to_decode_inside_dense(tiny, ids, randomize_routers):
    model = routed(tiny, randomize_routers)
    decoder = modadapt.GraphedDecoder(model)
    with modadapt.dense(model), pytest.raises(modadapt.ModAdaptError, match="outside modadapt.dense"):
        decoder.generate(ids(1, 5), max_new_tokens=2)
    assert decoder.generate(ids(1, 5), max_new_tokens=2).shape == (1, 7)


def test_measured_flops_inside_dense_are_the_unloaded_models():
    """vit-imagenet counts its dense FLOPs this way instead of on a copy: the routers count nothing."""
    from modadapt.metrics.measured_flops import measured_flops

    model = modadapt.convert(modadapt.build_preset("tiny-vit"), router="attention", capacity=0.25).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    routed = measured_flops(model, x)
    with modadapt.dense(model):
        inside = measured_flops(model, x)
    assert inside == measured_flops(modadapt.unload(copy.deepcopy(model)), x)
    assert inside["router"] == 0 and routed["router"] > 0 and routed["total"] < inside["total"]
