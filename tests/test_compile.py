"""torch.compile(fullgraph=True) traces converted models (static top-k path): outputs agree with eager."""

import pytest
import torch

import modadapt


def test_compiled_equals_eager_inference_and_training():
    model = modadapt.build_preset("tiny-llama")
    modadapt.convert(model, router="topk", capacity=0.5, inference_routing="topk")
    generator = torch.Generator().manual_seed(0)
    for layer in modadapt.mod_layers(model):
        layer.router.scorer.weight.data = torch.randn(layer.router.scorer.weight.shape, generator=generator)
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        keep_eager = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager, rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # nothing in the MoD path changes per call
            other = torch.randint(0, 256, (2, 16), generator=generator)
            torch.testing.assert_close(
                compiled(other, use_cache=False).logits, model(other, use_cache=False).logits, rtol=1e-5, atol=1e-5
            )
    assert not all(k.all() for k in keep_eager)  # tokens were really skipped

    model.train()
    eager_loss = model(ids, labels=ids).loss
    compiled_loss = compiled(ids, labels=ids).loss  # a training forward builds no cache: traceable
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(ids, labels=ids).loss, eager_loss, rtol=1e-5, atol=1e-5)
    compiled_loss.backward()
    for layer in modadapt.mod_layers(model):
        assert layer.router.scorer.weight.grad is not None


def test_vit_prefix_tokens_keep_static_shapes_under_fullgraph():
    model = modadapt.build_preset("tiny-vit")
    modadapt.convert(model, router="topk", capacity=0.25)
    generator = torch.Generator().manual_seed(0)
    for layer in modadapt.mod_layers(model):
        layer.router.scorer.weight.data = torch.randn(layer.router.scorer.weight.shape, generator=generator)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        eager = model(images)
        layer = modadapt.mod_layers(model)[0]
        assert layer.mod_state.last_keep[:, 0].all()  # the class token is always processed
        assert int(layer.mod_state.last_keep[0].sum()) == 1 + 16  # prefix + ceil(0.25 * 64)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(images), eager, rtol=1e-5, atol=1e-5)


def test_compiled_packed_threshold_model_equals_eager():
    """The packed path compiles with a graph break at each MoD layer's sync (the kept count sizes
    the packed sequence); no other break or warning, and outputs agree with eager."""
    import warnings

    model = modadapt.build_preset("tiny-llama")
    modadapt.convert(model, router="threshold-p", layers="all-but-first", packing="packed")
    generator = torch.Generator().manual_seed(0)
    for layer in modadapt.mod_layers(model):
        layer.router.scorer.weight.data = torch.randn(layer.router.scorer.weight.shape, generator=generator)
    ids = torch.randint(0, 256, (3, 16), generator=generator)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. Dynamo tracing through a cache wrapper
            compiled = torch.compile(model)(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    counts = [layer.mod_state.last_keep.sum(1) for layer in modadapt.mod_layers(model)]
    assert any(len(set(c.tolist())) > 1 for c in counts)  # rows kept different counts: really packed


@pytest.mark.parametrize(
    "dynamic, bucket, reserve", [(None, None, None), (False, 64, None), (False, None, None), (False, None, 1.0)]
)
def test_compiled_packed_threshold_model_stops_recompiling(dynamic, bucket, reserve):
    """Kept counts change every batch. torch.compile's default (automatic dynamic shapes) makes the
    packed size symbolic after the first change; with `dynamic=False`, `pack_bucket` keeps the
    graphs after each MoD layer's sync at bucketed sizes: either way nothing compiles after the
    second call. With `dynamic=False` and no buckets every new count compiles anew, unless
    `pack_reserve` fixes every packed size.

    Dynamo's recompile limit is raised so that the storm is not cut short: past the limit a code
    object runs eagerly, and from transformers 5.24 every model, layer and attention forward is
    one code object (`deprecate_kwarg`'s wrapper), which reaches the default limit (8) within the
    first call."""
    from torch._dynamo.utils import counters

    model = modadapt.build_preset("tiny-llama")
    modadapt.convert(
        model, router="threshold-p", layers="all-but-first", packing="packed", pack_bucket=bucket, pack_reserve=reserve
    )
    generator = torch.Generator().manual_seed(0)
    for layer in modadapt.mod_layers(model):
        layer.router.scorer.weight.data = torch.randn(layer.router.scorer.weight.shape, generator=generator)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=dynamic)
    graphs, kept = [], []
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            for _ in range(5):
                ids = torch.randint(0, 256, (3, 16), generator=generator)
                logits = compiled(ids, use_cache=False).logits
                torch.testing.assert_close(logits, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
                graphs.append(counters["stats"]["unique_graphs"])
                kept.append(sum(int(layer.mod_state.last_keep.sum()) for layer in modadapt.mod_layers(model)))
        gave_up = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason)
    finally:
        torch._dynamo.reset()
    assert len(set(kept)) == len(kept)  # every batch kept a different number of tokens
    assert gave_up == 0  # every call was compiled, none fell back to eager
    # (the second call compiles once more either way: the first filled the router's threshold cache)
    if dynamic is False and bucket is None and reserve is None:
        assert graphs[-1] > graphs[1], graphs  # the recompile storm buckets avoid
    else:
        assert graphs[1] == graphs[-1], graphs
