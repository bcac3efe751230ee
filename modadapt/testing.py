"""Conformance kits for router and adapter authors: the checks every built-in passes.

Subclass `RouterConformance` in your test suite and set `router_name` (and `router_kwargs`)::

    from modadapt.testing import AdapterConformance, RouterConformance

    class TestMyRouter(RouterConformance):
        router_name = "my-router"

    class TestMyFamily(AdapterConformance):
        preset = "tiny-myfamily"        # a registered preset your adapter handles

pytest then checks the router against the contract on a tiny model (`preset`, default tiny-llama),
converted at the router's `densest_layers` (set `scope` to route a sublayer): outputs keep their
shape, skipped tokens are untouched (a routed sublayer adds exactly nothing for them), decoding with a cache equals a full forward under the causal rule, padding never
counts as kept, and gradients reach the trainable parameters. `AdapterConformance` adds the
invariants of a model family (with any `router_name`, default `random`): capacity 1 reproduces
the dense model, a left-padded row equals the row alone, save/load reproduces the outputs, and
unload restores the original state dict. The inputs come from the adapter's `example_inputs`;
checks that need what a family lacks (a KV cache, token-only inputs to pad) are skipped with the
reason, and so are presets the router cannot convert at all (`Router.unsupported_reason`).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import modadapt

from .adapters.hf.versions import cache_argument, returned_cache
from .cutoffs import calibrates
from .mod_layer import state_of
from .plugins import find_adapter, get_router
from .routers.base import kept_count


def _output(out: Any) -> torch.Tensor:
    """The main output tensor of a forward: a transformers model's logits, a timm model's output."""
    return out.logits if hasattr(out, "logits") else out


class RouterConformance:
    """Contract tests every registered router should pass."""

    router_name: str = ""
    router_kwargs: dict = {}
    capacity: float = 0.5
    preset: str = "tiny-llama"
    #: A `ModConfig.layers` rule; None: the router's `densest_layers`.
    layers: Any = None
    #: `ModConfig.scope`: what the MoD layers route (the whole block, its attention or its MLP).
    scope: str = "block"

    def skip_unsupported(self, model: nn.Module) -> None:
        """Skip, with its reason, a preset the router cannot convert at all (`Router.unsupported_reason`:
        `noop-expert` on a model without experts)."""
        reason = get_router(self.router_name).obj.unsupported_reason(model, find_adapter(model))
        if reason is not None:
            pytest.skip(reason)

    def make_model(self, randomize: bool = True, **config: Any) -> nn.Module:
        model = modadapt.build_preset(self.preset)
        self.skip_unsupported(model)
        layers = self.layers if self.layers is not None else get_router(self.router_name).obj.densest_layers
        options = dict(
            router=self.router_name,
            capacity=self.capacity,
            layers=layers,
            router_kwargs=dict(self.router_kwargs),
            scope=self.scope,
        )
        modadapt.convert(model, **{**options, **config})
        if randomize:
            generator = torch.Generator().manual_seed(0)
            for layer in modadapt.mod_layers(model):
                for param in layer.router.parameters():
                    param.data = torch.randn(param.shape, generator=generator) * 0.5
        return model

    def inputs(self, model: nn.Module, batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, Any]:
        """Forward keyword arguments from the adapter's `example_inputs`."""
        adapter = state_of(model).adapter if state_of(model) is not None else find_adapter(model)
        inputs = adapter.example_inputs(model, batch, length, seed)
        if inputs is None:
            pytest.skip(f"adapter {adapter.name!r} provides no example_inputs")
        return inputs

    def token_inputs(self, model: nn.Module, batch: int = 2, length: int = 12) -> torch.Tensor:
        """Token ids alone, for the checks that pad or cut a sequence (skipped when the family
        needs more than token ids)."""
        inputs = self.inputs(model, batch, length)
        if set(inputs) != {"input_ids"}:
            pytest.skip(f"{self.preset} takes {sorted(inputs)}, not token ids alone")
        return inputs["input_ids"]

    def require_decoding(self, model: nn.Module) -> None:
        calls = [layer.mod_state.call for layer in modadapt.mod_layers(model)]
        # A routed MLP keeps no cache of its own; the layer around it does.
        if not all(call.causal and (call.cache is not None or call.token_wise) for call in calls):
            pytest.skip(f"{self.preset} does not decode with a KV cache")

    def test_shapes_and_registry(self):
        model = self.make_model()
        inputs = self.inputs(model)
        with torch.no_grad():
            out = _output(model(**inputs))
            modadapt.unload(model)
            dense = _output(model(**inputs))
        assert out.shape == dense.shape
        assert torch.isfinite(out).all()

    def test_registered_router_is_used(self):
        model = self.make_model()
        assert all(layer.router.name == self.router_name for layer in modadapt.mod_layers(model))

    def test_skipped_tokens_untouched(self):
        model = self.make_model().train()
        layer = modadapt.mod_layers(model)[0]
        name = layer.mod_state.call.hidden
        seen = {}
        handle = layer.register_forward_hook(
            lambda m, args, kwargs, out: seen.update(x=kwargs.get(name, args[0] if args else None), y=out),
            with_kwargs=True,
        )
        model(**self.inputs(model))
        handle.remove()
        skipped = ~layer.mod_state.last_keep
        y = seen["y"][0] if isinstance(seen["y"], tuple) else seen["y"]
        if layer.mod_state.call.skipped is not None:  # a sublayer: adds nothing to the residual
            assert torch.equal(y[skipped], torch.zeros_like(y[skipped]))
        else:
            assert torch.equal(seen["x"][skipped], y[skipped])

    def test_cached_decode_equals_full_forward(self):
        model = self.make_model().eval()
        self.require_decoding(model)
        inputs = self.inputs(model, length=10)
        ids = inputs["input_ids"]
        start = ids.shape[1] - 4
        with torch.no_grad():
            full = model(**inputs).logits
            out = model(**{**inputs, "input_ids": ids[:, :start]}, use_cache=True)
            cache, steps = returned_cache(out), [out.logits]
            for t in range(start, ids.shape[1]):
                out = model(ids[:, t : t + 1], **{cache_argument(model.forward): cache}, use_cache=True)
                cache = returned_cache(out)
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)

    def test_padding_never_kept(self):
        model = self.make_model().eval()
        ids = self.token_inputs(model, length=10)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for layer in modadapt.mod_layers(model):
            assert not layer.mod_state.last_keep[0, :4].any()

    def test_gradients_reach_trainable_parameters(self):
        model = self.make_model().train()
        loss = _output(model(**self.inputs(model))).float().square().mean()
        aux = modadapt.aux_loss(model)
        (loss if aux is None else loss + aux).backward()
        for layer in modadapt.mod_layers(model):
            for name, param in layer.router.named_parameters():
                if param.requires_grad:
                    assert param.grad is not None and torch.isfinite(param.grad).all(), name

    def test_calibrated_cutoffs_keep_the_capacity(self):
        """A router with a calibrated causal cut-off: after `modadapt.calibrate_cutoffs`, each
        layer's cut-off is the `ceil(capacity * n)`-th largest of the calibration batch's eligible
        statistics (`Router.cutoff_statistic`: exactly that many kept but for ties, e.g. A-MoD's
        first token, 1 in every row), and, where they are per token, the causal rule keeps exactly
        the tokens at or above it (so the statistic is the one `causal_keep` thresholds)."""
        model = self.make_model().eval()
        layers = modadapt.mod_layers(model)
        if not any(calibrates(layer.router) for layer in layers):
            pytest.skip(f"{self.router_name} at capacity {self.capacity} has no calibrated causal cut-off")
        if not all(layer.mod_state.call.causal for layer in layers):
            pytest.skip(f"{self.preset} attends both ways: it keeps its top-k at inference")
        inputs = self.inputs(model, batch=3, length=16)
        modadapt.calibrate_cutoffs(model, [inputs])
        seen = {}
        for layer in layers:
            layer.router.cutoff_probe = lambda i, v, e: seen.setdefault(i, (v, e))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for layer in layers:
                layer.router.cutoff_probe = None
        for layer in layers:
            index, router = layer.mod_state.index, layer.router
            if not calibrates(router):
                continue
            values, eligible = seen[index]
            expected = kept_count(router.capacity, int(eligible.sum()))
            cut = router.causal_threshold(index)
            above = (values >= cut) & eligible
            assert int(((values > cut) & eligible).sum()) < expected <= int(above.sum()), f"layer {index}"
            if values.shape == layer.mod_state.last_keep.shape:
                assert torch.equal(layer.mod_state.last_keep & eligible, above), f"layer {index}"


class AdapterConformance(RouterConformance):
    """The invariants of a model family (`preset`) under a router, on top of RouterConformance."""

    router_name: str = "random"

    def test_full_capacity_equals_dense(self):
        model = modadapt.build_preset(self.preset)
        self.skip_unsupported(model)
        inputs = self.inputs(model)
        with torch.no_grad():
            dense = _output(model(**inputs))
            converted = copy.deepcopy(model)
            layers = self.layers if self.layers is not None else get_router(self.router_name).obj.densest_layers
            modadapt.convert(
                converted,
                router=self.router_name,
                capacity=1.0,
                layers=layers,
                router_kwargs=dict(self.router_kwargs),
                scope=self.scope,
            )
            routed = _output(converted(**inputs))
        assert torch.equal(routed, dense)
        assert all(row["kept_fraction"] == 1.0 for row in modadapt.routing_stats(converted))

    def test_left_padded_row_equals_row_alone(self):
        model = self.make_model().eval()
        ids = self.token_inputs(model, length=10)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with torch.no_grad():
            batched = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
            alone = model(ids[:1, 4:]).logits
        torch.testing.assert_close(batched[0, 4:], alone[0], rtol=0, atol=1e-5)
        for layer, keep in zip(modadapt.mod_layers(model), keeps):
            assert torch.equal(keep[0, 4:], layer.mod_state.last_keep[0])

    def test_save_load_reproduces_outputs(self, tmp_path):
        model = self.make_model().eval()
        inputs = self.inputs(model)
        with torch.no_grad():
            expected = _output(model(**inputs))
        modadapt.save(model, tmp_path / "saved")
        loaded = modadapt.load(tmp_path / "saved")
        assert state_of(loaded).config_dict() == state_of(model).config_dict()
        with torch.no_grad():
            assert torch.equal(_output(loaded(**inputs)), expected)

    def test_unload_restores_state_dict(self):
        model = modadapt.build_preset(self.preset)
        self.skip_unsupported(model)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        classes = [type(m) for m in model.modules()]
        converted = self.make_model()
        modadapt.unload(converted)
        state = converted.state_dict()
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in state)
        assert [type(m) for m in converted.modules()] == classes
