"""PEFT on a converted model: `modadapt.peft_config` keeps the routers trainable under
`peft.get_peft_model`, saves them with the adapter and restores them on load."""

from __future__ import annotations

import pytest
import torch

import modadapt
from modadapt import ModAdaptError

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e .[test])")
pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(tiny, randomize_routers, family):
    model = modadapt.convert(tiny(family), router="topk", capacity=0.5)
    return randomize_routers(model, scale=0.5)


def _router_params(model):
    return {n: p for n, p in model.named_parameters() if ".router." in n}


def test_plain_lora_freezes_the_routers(tiny, randomize_routers):
    """What `peft_config` is for: peft alone freezes every parameter that is not LoRA's."""
    model = _converted(tiny, randomize_routers, "llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert _router_params(wrapped) and not any(p.requires_grad for p in _router_params(wrapped).values())


def test_lora_trains_saves_and_restores_the_routers(core_family, tiny, ids, randomize_routers, tmp_path):
    model = _converted(tiny, randomize_routers, core_family)
    wrapped = peft.get_peft_model(model, modadapt.peft_config(model, r=4, lora_alpha=8))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    routers = {n for n in _router_params(wrapped) if ".modules_to_save." in n}
    assert routers and routers <= trainable
    assert any("lora_" in n for n in trainable) and trainable <= routers | {n for n in trainable if "lora_" in n}

    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if n in routers}
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 16, seed=2)
    wrapped.train()
    wrapped(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    after = dict(wrapped.named_parameters())
    assert all(not torch.equal(after[n].detach(), before[n]) for n in routers), "a router did not train"
    # the MoD layers route with the trained copies
    layer = modadapt.mod_layers(wrapped.base_model.model)[0]
    copy = layer.router.modules_to_save["default"]
    assert layer.router.score.__self__ is copy
    assert {id(p) for p in copy.parameters()} <= {id(after[n]) for n in routers}

    wrapped.eval()
    probe = ids(2, 12, seed=3)
    with torch.no_grad():
        expected = wrapped(input_ids=probe).logits
    wrapped.save_pretrained(tmp_path / "adapter")
    fresh = modadapt.convert(tiny(core_family), router="topk", capacity=0.5)  # same base, untrained routers
    with torch.no_grad():
        assert not torch.allclose(fresh(probe).logits, expected, atol=1e-3)
    restored = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    restored_routers = {n: p for n, p in restored.named_parameters() if ".modules_to_save." in n}
    assert restored_routers.keys() == routers
    assert all(torch.equal(restored_routers[n], after[n]) for n in routers)
    with torch.no_grad():  # the calibrated causal cut-offs (buffers) come along too
        torch.testing.assert_close(restored(input_ids=probe).logits, expected, rtol=1e-5, atol=1e-5)

    merged = wrapped.merge_and_unload()  # the trained routers back in the layers; a plain MoD model
    modadapt.save(merged, tmp_path / "merged")
    loaded = modadapt.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_config_adds_the_routers_to_a_given_config(tiny, randomize_routers):
    model = _converted(tiny, randomize_routers, "llama")
    given = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    config = modadapt.peft_config(model, given)
    assert config.modules_to_save == ["lm_head", "model.layers.1.router", "model.layers.3.router"]
    assert given.modules_to_save == ["lm_head"]  # a copy
    with pytest.raises(ModAdaptError, match="not both"):
        modadapt.peft_config(model, given, r=4)
    with pytest.raises(ModAdaptError, match="not converted"):
        modadapt.peft_config(tiny("llama"))


def test_a_shared_router_is_refused(tiny):
    model = modadapt.convert(tiny("llava"), router="shared-vl", capacity=0.5, layers=[1, 3])
    with pytest.raises(ModAdaptError, match="share one router"):
        modadapt.peft_config(model)


@pytest.mark.parametrize(("kind", "scope", "sublayer"), [("llama", "attention", "self_attn"), ("olmo2", "mlp", "mlp")])
def test_peft_keeps_the_routers_of_routed_sublayers(kind, scope, sublayer, tiny, ids, randomize_routers, tmp_path):
    """With `scope` 'attention' / 'mlp' the router sits on the sublayer; peft_config names it there."""
    model = randomize_routers(modadapt.convert(tiny(kind), router="topk", capacity=0.5, scope=scope), scale=0.5)
    config = modadapt.peft_config(model, r=4)
    assert config.modules_to_save == [f"model.layers.{i}.{sublayer}.router" for i in (1, 3)]
    wrapped = peft.get_peft_model(model, config)
    x = ids(4, 16, seed=2)
    wrapped.train()
    wrapped(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if ".modules_to_save." in n)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(input_ids=x).logits
    wrapped.save_pretrained(tmp_path / "adapter")
    fresh = modadapt.convert(tiny(kind), router="topk", capacity=0.5, scope=scope)
    restored = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
