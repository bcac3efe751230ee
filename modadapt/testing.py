"""Conformance kit for third-party router authors.

Subclass `RouterConformance` in your test suite and set `router_name` (and `router_kwargs`)::

    from modadapt.testing import RouterConformance

    class TestMyRouter(RouterConformance):
        router_name = "my-router"

pytest then checks your router against the contract on a tiny model: outputs keep their shape,
skipped tokens are untouched, decoding with a cache equals a full forward under the causal rule,
padding never counts as kept, and gradients reach the trainable parameters.
"""

from __future__ import annotations

import torch

import modadapt


class RouterConformance:
    """Contract tests every registered router should pass."""

    router_name: str = ""
    router_kwargs: dict = {}
    capacity: float = 0.5
    preset: str = "tiny-llama"

    def make_model(self, randomize: bool = True):
        model = modadapt.build_preset(self.preset)
        modadapt.convert(
            model, router=self.router_name, capacity=self.capacity, layers="all-but-first",
            router_kwargs=dict(self.router_kwargs),
        )
        if randomize:
            generator = torch.Generator().manual_seed(0)
            for layer in modadapt.mod_layers(model):
                for param in layer.router.parameters():
                    param.data = torch.randn(param.shape, generator=generator) * 0.5
        return model

    def inputs(self, batch: int = 2, length: int = 12):
        return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))

    def test_shapes_and_registry(self):
        model = self.make_model()
        ids = self.inputs()
        logits = model(ids).logits
        assert logits.shape == (*ids.shape, model.config.vocab_size)
        assert torch.isfinite(logits).all()
        assert modadapt.mod_layers(model)[0].router.name == self.router_name

    def test_skipped_tokens_untouched(self):
        model = self.make_model().train()
        layer = modadapt.mod_layers(model)[0]
        seen = {}
        handle = layer.register_forward_hook(
            lambda m, args, kwargs, out: seen.update(x=kwargs.get("hidden_states", args[0] if args else None), y=out),
            with_kwargs=True,
        )
        model(self.inputs())
        handle.remove()
        skipped = ~layer.mod_state.last_keep
        assert torch.equal(seen["x"][skipped], seen["y"][skipped])

    def test_cached_decode_equals_full_forward(self):
        model = self.make_model().eval()
        ids = self.inputs(batch=2, length=10)
        with torch.no_grad():
            full = model(ids).logits
            out = model(ids[:, :6], use_cache=True)
            cache, steps = out.past_key_values, [out.logits]
            for t in range(6, 10):
                out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)

    def test_padding_never_kept(self):
        model = self.make_model().eval()
        ids = self.inputs(batch=2, length=10)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for layer in modadapt.mod_layers(model):
            assert not layer.mod_state.last_keep[0, :4].any()

    def test_gradients_reach_trainable_parameters(self):
        model = self.make_model().train()
        ids = self.inputs()
        loss = model(ids, labels=ids).loss
        loss.backward()
        for layer in modadapt.mod_layers(model):
            for name, param in layer.router.named_parameters():
                if param.requires_grad:
                    assert param.grad is not None and torch.isfinite(param.grad).all(), name
