"""Packed MoD layers (`packing='packed'`, `modadapt.varlen`) give what the padded layout gives.

On CPU the packed call runs the reference per-segment kernel; the GPU benchmark checks the flash
kernel against the padded path and against its reference (`benchmarks/speed.py`, scenario `check`).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from conftest import load_benchmark, randomize_router_weights, threads_restored
from torch import nn

import modadapt
from modadapt import varlen
from modadapt.adapters.hf.versions import cache_kwarg, returned_cache
from modadapt.config import pack_reserve_value
from modadapt.convert import _holds_no_cache
from modadapt.errors import ModAdaptError
from modadapt.routers import base
from modadapt.routers.base import pack_reserved, pack_rows


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the packed attention calls (so a test cannot pass by silently padding)."""
    calls = []
    reference = varlen._reference

    def counting(query, *args, **kwargs):
        calls.append(query.shape[0])
        return reference(query, *args, **kwargs)

    monkeypatch.setattr(varlen, "_reference", counting)
    return calls


def _pair(tiny, family, randomize_routers, **config):
    """The same randomly routed model converted twice: padded and packed (skipped for a family
    whose layers cannot run packed)."""
    models = []
    for packing in ("padded", "packed"):
        model = modadapt.convert(tiny(family), router="threshold-p", layers="all-but-first", packing=packing, **config)
        randomize_routers(model)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        models.append(model)
    calls = [layer.mod_state.call for layer in modadapt.mod_layers(models[1])]
    if all(call.packed_attention is None or call.attn_implementation() != "sdpa" for call in calls):
        pytest.skip(f"{family}'s attention cannot run packed (soft-capped, or not SDPA)")
    return models


def _slides(layer) -> bool:
    return layer.mod_state.call.window is not None


def test_packed_equals_padded_eval(family, tiny, ids, left_pad, randomize_routers, last_keeps, packed_calls):
    padded, packed = _pair(tiny, family, randomize_routers)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    with torch.no_grad():
        expected = padded(x, attention_mask=mask, position_ids=pos).logits
        keeps = last_keeps(padded)
        got = packed(x, attention_mask=mask, position_ids=pos).logits
    assert packed_calls, "the packed path did not run"
    real = mask.bool()
    counts = torch.stack([k.sum(1) for k in keeps])
    assert (counts.max(1).values != counts.min(1).values).any(), "rows keep equal counts: packing is trivial"
    for a, b in zip(keeps, last_keeps(packed)):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_packed_batch_equals_each_row_alone(tiny, ids, randomize_routers, packed_calls):
    _, packed = _pair(tiny, "llama", randomize_routers)
    x = ids(3, 10)
    with torch.no_grad():
        batched = packed(x).logits
        for row in range(3):
            torch.testing.assert_close(batched[row], packed(x[row : row + 1]).logits[0], rtol=1e-4, atol=1e-5)
    assert packed_calls


def test_packed_training_gives_padded_loss_and_gradients(core_family, tiny, ids, randomize_routers, packed_calls):
    padded, packed = _pair(tiny, core_family, randomize_routers)
    x = ids(3, 12)
    losses, grads = [], []
    for model in (padded, packed):
        model.train()
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert packed_calls
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any("router" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bucket", [1, 7, 64])
def test_bucketed_packing_gives_the_exact_pack(
    core_family, bucket, tiny, ids, left_pad, randomize_routers, packed_calls
):
    """`pack_bucket` pads a packed call without a cache with filler tokens in a segment of their
    own: logits (left padding, eval), the training loss and every gradient equal the exact pack."""
    exact = modadapt.convert(tiny(core_family), router="threshold-p", layers="all-but-first", packing="packed")
    bucketed = modadapt.convert(
        tiny(core_family), router="threshold-p", layers="all-but-first", packing="packed", pack_bucket=bucket
    )
    for model in (exact, bucketed):
        randomize_routers(model)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    with torch.no_grad():
        expected = exact(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        before = len(packed_calls)
        got = bucketed(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
    sizes = packed_calls[before:]  # tokens per packed attention call: bucketed
    assert sizes and all(n % bucket == 0 for n in sizes)
    if bucket == 64:
        assert all(n == 64 for n in sizes)  # 3 rows x 12 tokens: every layer's pack fills one bucket
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    losses, grads = [], []
    for model in (exact, bucketed):
        model.train()
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    assert packed_calls


def test_pack_rows_buckets_with_a_filler_segment():
    keep = torch.tensor([[True, False, True], [False, False, True]])
    indices, segments, _ = pack_rows(keep, None, None, bucket=4)
    assert indices.tolist() == [[0, 2, 5, 6]] and segments.tolist() == [0, 2, 3, 4]  # filler: index B*T = 6
    indices, segments, _ = pack_rows(keep, None, None, bucket=3)
    assert indices.tolist() == [[0, 2, 5]] and segments.tolist() == [0, 2, 3, 3]  # a multiple already
    with pytest.raises(ModAdaptError, match="pack_bucket"):
        modadapt.ModConfig(pack_bucket=0)


def _host_counts(monkeypatch) -> list:
    """Makes the packed path's count of kept tokens on the host (`nonzero`) fail, and lists the
    rows layout's calls (`pack_mask`, which counts on the host too): a reserved pack needs neither."""

    def refuse(*args, **kwargs):
        raise AssertionError("a reserved pack counted its kept tokens on the host")

    calls, rows_layout = [], base.pack_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return rows_layout(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    monkeypatch.setattr(base, "pack_mask", counting)
    return calls


def _exact_and_reserved(tiny, family, randomize_routers, scope="block", **config):
    """The same randomly routed model, packed with exact counts and with `config` (a reserve),
    dropout off so that training forwards compare too."""
    models = []
    for extra in ({}, config):
        model = modadapt.convert(
            tiny(family), router="threshold-p", layers="all-but-first", packing="packed", scope=scope, **extra
        )
        randomize_routers(model)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        models.append(model)
    return models


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bucket", [None, 8])
def test_reserved_packing_needs_no_host_count_and_gives_the_exact_pack(
    core_family, rows, bucket, tiny, ids, left_pad, randomize_routers, packed_calls, monkeypatch
):
    """`pack_reserve` packs each layer into a fixed share of the call's tokens (batch 1 too, which
    otherwise runs unpacked): the logits equal the exact pack's, no layer counts on the host, and a
    forward in which no layer overflows runs once."""
    exact, reserved = _exact_and_reserved(tiny, core_family, randomize_routers, pack_reserve=1.0, pack_bucket=bucket)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)[:rows]])
    with torch.no_grad():
        expected = exact(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        before = len(packed_calls)
        with monkeypatch.context() as patch:
            counted = _host_counts(patch)
            got = reserved(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
    layers = modadapt.mod_layers(reserved)
    windowed = [layer for layer in layers if _slides(layer) and x.shape[1] > layer.mod_state.call.window]
    slots = -(-x.numel() // (bucket or 1)) * (bucket or 1)
    assert packed_calls[before:] == [slots] * (len(layers) - len(windowed))  # sliding windows pad
    assert len(counted) == len(windowed)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    assert modadapt.mod_layer.state_of(reserved).pack_reruns == 0


def _device_reads(monkeypatch, forward) -> int:
    """How often `forward()` reads a tensor's value on the host (`bool`, `int`, `float`, `item`,
    `tolist`, `nonzero`): each is a host sync on a GPU. The per-segment SDPA that stands in for the
    flash varlen kernel off CUDA is left out (it reads its segment lengths; the kernel does not)."""
    reads, inside = [0], [False]
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += not inside[0]
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    reference = varlen._reference

    def uncounted(*args, **kwargs):
        inside[0] = True
        try:
            return reference(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(varlen, "_reference", uncounted)
    with torch.no_grad():
        forward()
    monkeypatch.undo()
    return reads[0]


@pytest.mark.parametrize("rows", [1, 3])
def test_reserved_packing_reads_the_device_once_more_than_dense(rows, tiny, ids, left_pad, monkeypatch):
    """A forward packed into reserved slots waits for the GPU once more than the dense model's (the
    overflow check at the stack's end), padded or not: the token roles keep an all-true mask rather
    than read it, and no layer counts its tokens; the exact pack reads once per MoD layer."""
    exact, reserved = (
        randomize_router_weights(
            modadapt.convert(tiny("llama"), router="threshold-p", layers="all-but-first", packing="packed", **extra)
        )
        for extra in ({}, {"pack_reserve": 1.0})
    )
    dense = tiny("llama")
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (40, 64, 24)[:rows]])
    call = dict(attention_mask=mask, position_ids=pos, use_cache=False)
    for model in (exact, reserved, dense):
        with torch.no_grad():
            model(x, **call)  # first calls cache what they compute once
    reads = {
        name: _device_reads(monkeypatch, lambda m=m: m(x, **call))
        for name, m in (("dense", dense), ("reserved", reserved), ("exact", exact))
    }
    assert reads["reserved"] == reads["dense"] + 1
    assert reads["exact"] >= reads["dense"] + len(modadapt.mod_layers(exact))
    assert modadapt.mod_layer.state_of(reserved).pack_reruns == 0


def test_reserved_packing_that_overflows_runs_again_exactly(core_family, tiny, ids, left_pad, randomize_routers):
    """A layer that keeps more tokens than `pack_reserve` holds makes the forward run again with
    exact counts: the logits are still the exact pack's, and the rerun is counted."""
    exact, reserved = _exact_and_reserved(tiny, core_family, randomize_routers, pack_reserve=0.05)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    with torch.no_grad():
        expected = exact(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        with pytest.warns(UserWarning, match=r"pack_reserve 0\.05 holds fewer tokens"):  # once per model
            got = reserved(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        reserved(x, attention_mask=mask, position_ids=pos, use_cache=False)
    assert modadapt.mod_layer.state_of(reserved).pack_reruns == 2
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_auto_reserve_learns_each_layers_share(tiny, ids, left_pad, randomize_routers, packed_calls):
    """`pack_reserve="auto"`: a layer's first reserved call holds every token; the forward's one
    read of the kept counts teaches each layer its share (not in a call too short to tell), and
    later calls reserve 1.1 times it (per layer, rounded up to a sixteenth, then the bucket); a
    layer that keeps more than that makes the forward run again exactly (no warning: the share
    grows; the layers after it, which saw a cut selection, learn nothing) and all along the logits
    are the exact pack's."""
    exact, auto = _exact_and_reserved(tiny, "llama", randomize_routers, pack_reserve="auto", pack_bucket=4)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (40, 48, 20)])
    assert x.numel() >= modadapt.mod_layer.AUTO_RESERVE_MIN_TOKENS
    call = dict(attention_mask=mask, position_ids=pos, use_cache=False)
    layers, tokens, real = modadapt.mod_layers(auto), x.numel(), mask.bool()
    with torch.no_grad():
        auto(ids(2, 30), use_cache=False)  # 60 tokens: too few to teach a share
        assert all(layer.mod_state.reserve_share is None for layer in layers)
        expected = exact(x, **call).logits
        before = len(packed_calls)
        first = auto(x, **call).logits
        assert packed_calls[before:] == [tokens] * len(layers)  # nothing learned yet: every token
        shares = [layer.mod_state.reserve_share for layer in layers]
        assert shares == [float(layer.mod_state.last_keep.sum()) / tokens for layer in layers]
        before = len(packed_calls)
        second = auto(x, **call).logits
        auto_reserve = modadapt.mod_layer.auto_reserve
        reserved = [modadapt.mod_layer.reserved_slots(auto_reserve(share), tokens, 4) for share in shares]
        assert packed_calls[before:] == reserved and len(set(reserved)) > 1  # each layer its own
        torch.testing.assert_close(first[real], expected[real], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second[real], expected[real], rtol=1e-4, atol=1e-5)
        assert modadapt.mod_layer.state_of(auto).pack_reruns == 0
        layers[0].mod_state.reserve_share = 1 / tokens  # as if it had kept one token: now it overflows
        layers[1].mod_state.reserve_share = shares[1] / 2  # and so would layer 1, but it learns nothing
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            third = auto(x, **call).logits
    torch.testing.assert_close(third[real], expected[real], rtol=1e-4, atol=1e-5)
    assert modadapt.mod_layer.state_of(auto).pack_reruns == 1
    assert layers[0].mod_state.reserve_share == shares[0]
    assert layers[1].mod_state.reserve_share == shares[1] / 2


def test_a_reserve_no_layer_packs_into_keeps_the_padding_read(tiny, ids, monkeypatch):
    """Roles skip their mask read only where a layer packs into the reserve: padded packing and
    top-k routing at inference (a static shape) never do, and keep the read that spares them the
    masked path (their host reads are those of the same model without a reserve)."""
    x = ids(2, 12)
    call = dict(attention_mask=torch.ones_like(x), use_cache=False)
    for extra in ({"packing": "padded", "router": "threshold-p"}, {"inference_routing": "topk", "router": "topk"}):
        plain, reserved = (
            randomize_router_weights(modadapt.convert(tiny("llama"), layers="all-but-first", **extra, **more))
            for more in ({}, {"pack_reserve": 1.0})
        )
        for model in (plain, reserved):
            with torch.no_grad():
                model(x, **call)
        reads = [_device_reads(monkeypatch, lambda m=m: m(x, **call)) for m in (plain, reserved)]
        assert reads[0] == reads[1] and reads[0] >= 1, extra


def test_no_cache_check_reads_a_vision_language_text_config():
    """LLaVA's roles are taken at the top-level model, whose config keeps `use_cache` in its text
    config: a call that leaves it to the config makes a cache there."""

    class Config:
        def get_text_config(self, decoder=False):
            return types.SimpleNamespace(use_cache=True)

    module = types.SimpleNamespace(config=Config())
    assert not _holds_no_cache(module, {}) and _holds_no_cache(module, {"use_cache": False})


def test_calibration_makes_the_auto_reserve_learn_afresh(tiny, ids):
    """New cut-offs keep other shares: `calibrate_cutoffs` forgets what `pack_reserve="auto"` learned."""
    model = modadapt.convert(tiny("llama"), router="topk", capacity=0.5, packing="packed", pack_reserve="auto")
    randomize_router_weights(model)
    with torch.no_grad():
        model(ids(4, 40), use_cache=False)  # 160 tokens: enough to teach
    layers = modadapt.mod_layers(model)
    assert all(layer.mod_state.reserve_share is not None for layer in layers)
    modadapt.calibrate_cutoffs(model, [ids(2, 12, seed=1)])
    assert all(layer.mod_state.reserve_share is None for layer in layers)


def test_auto_reserve_rounds_a_creeping_share_to_the_same_slots():
    """A layer's reserve moves in steps of a sixteenth: shares a little apart give the same slots
    (one compiled shape), each reserve holds 1.1 times its share, and none exceeds every token."""
    from modadapt.mod_layer import AUTO_RESERVE_STEP, auto_reserve

    assert auto_reserve(None) == 1.0
    assert auto_reserve(0.50) == auto_reserve(0.505) == auto_reserve(0.51) == 9 / 16
    assert auto_reserve(0.52) == 10 / 16
    assert auto_reserve(0.95) == 1.0
    assert auto_reserve(10 / 11 * 0.5) == 0.5  # exactly a step after the margin: not one more
    for share in torch.linspace(0.01, 0.9, 50).tolist():
        assert 1.1 * share - 1e-9 <= auto_reserve(share) < 1.1 * share + AUTO_RESERVE_STEP


def test_pack_reserve_values():
    assert modadapt.ModConfig(pack_reserve="auto").pack_reserve == "auto"
    assert modadapt.ModConfig(pack_reserve=1).pack_reserve == 1.0
    assert pack_reserve_value("auto") == "auto" and pack_reserve_value("0.5") == 0.5  # --pack-reserve
    for bad in (0, 1.5, "most", "half", True):
        with pytest.raises(ModAdaptError, match="pack_reserve must be a share in"):
            modadapt.ModConfig(pack_reserve=bad)


def test_reserved_packing_leaves_training_and_cached_calls_exact(
    core_family, tiny, ids, randomize_routers, monkeypatch
):
    """Training forwards and calls with a KV cache count exactly (a rerun would double a training
    step's router statistics; a cache must hold exact counts), so a tiny reserve changes nothing."""
    exact, reserved = _exact_and_reserved(tiny, core_family, randomize_routers, pack_reserve=0.05)
    x = ids(2, 9, seed=3)
    losses = []
    for model in (exact, reserved):
        model.train()
        losses.append(model(x, labels=x, use_cache=False).loss.detach())
        model.eval()
    torch.testing.assert_close(losses[1], losses[0])
    with torch.no_grad():
        torch.testing.assert_close(reserved(x, use_cache=True).logits, exact(x, use_cache=True).logits)
    assert modadapt.mod_layer.state_of(reserved).pack_reruns == 0


@pytest.mark.parametrize("scope", ["block", "mlp"])
def test_reserved_packing_stays_off_in_a_call_with_a_cache(core_family, scope, tiny, ids, randomize_routers):
    """A forward that holds a KV cache never packs into reserved slots, not even a sublayer that
    has no cache of its own (an MLP): running it again would append to the cache twice."""
    exact, reserved = _exact_and_reserved(tiny, core_family, randomize_routers, pack_reserve=0.05, scope=scope)
    x = ids(2, 9, seed=4)
    with torch.no_grad():
        caches = [returned_cache(model(x, use_cache=True)) for model in (exact, reserved)]
        for model, cache in zip((exact, reserved), caches):
            cache_kwargs = cache_kwarg(model, cache)
            model.last = model(x[:, -1:], **cache_kwargs, use_cache=True).logits
    torch.testing.assert_close(reserved.last, exact.last)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == 10
    assert modadapt.mod_layer.state_of(reserved).pack_reruns == 0


def test_calibration_counts_exactly_under_a_reserve(tiny, ids):
    """`calibrate_cutoffs` packs exactly: a reserve too small for the layers would run each
    overflowing pass again and count its statistics twice."""
    models = []
    for extra in ({}, {"pack_reserve": 0.05}):
        model = modadapt.convert(
            tiny("llama"), router="topk", capacity=0.5, layers="all-but-first", packing="packed", **extra
        )
        randomize_router_weights(model)
        model.config.use_cache = False
        models.append(model)
    batches = [ids(3, 12, seed=s) for s in range(3)]
    found = [modadapt.calibrate_cutoffs(model, batches) for model in models]
    assert found[1] == pytest.approx(found[0])
    assert modadapt.mod_layer.state_of(models[1]).pack_reruns == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel and sync counts need CUDA")
def test_reserved_packing_on_cuda_syncs_at_most_once_more_than_dense(tiny, ids, left_pad, randomize_routers):
    """On CUDA (bf16, `packing="auto"`: the flash varlen kernel) a reserved pack gives the exact
    pack's logits at batch 1 and in a padded batch, and its forward syncs with the host at most once
    more than the dense model's (the overflow check; on the H200 as often as dense: 2 = 2), where
    the exact pack syncs at every MoD layer.
    Run on the GPU machine: `python -m pytest tests/test_packing.py -k cuda`."""
    import warnings

    def syncs(model, *args, **kwargs) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    exact, reserved = (
        randomize_routers(modadapt.convert(tiny("llama"), router="threshold-p", layers="all-but-first", **extra))
        .cuda()
        .bfloat16()
        for extra in ({}, {"pack_reserve": 1.0})
    )
    dense = tiny("llama").cuda().bfloat16()
    for rows in (1, 3):
        x, mask, pos = (t.cuda() for t in left_pad([ids(1, n, seed=n)[0] for n in (40, 64, 24)[:rows]]))
        call = dict(attention_mask=mask, position_ids=pos, use_cache=False)
        with torch.no_grad():
            expected = exact(x, **call).logits.float()
            got = reserved(x, **call).logits.float()
            real = mask.bool()
            assert (got[real] - expected[real]).norm() / expected[real].norm() < 2e-2
            layers = len(modadapt.mod_layers(reserved))
            base = syncs(dense, x, **call)
            assert syncs(reserved, x, **call) <= base + 1
            assert syncs(exact, x, **call) >= base + layers
    assert modadapt.mod_layer.state_of(reserved).pack_reruns == 0


def test_pack_reserved_cuts_an_overflow_inside_its_slots():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    # fillers (index B*T = 6) in segments of at most T = 3 tokens, unused offsets empty
    indices, segments, _, kept = pack_reserved(keep, None, None, slots=6)
    assert indices.tolist() == [[0, 2, 4, 5, 6, 6]] and segments.tolist() == [0, 2, 4, 6, 6] and int(kept) == 4
    indices, segments, _, kept = pack_reserved(keep, None, None, slots=10)
    assert indices.tolist() == [[0, 2, 4, 5] + [6] * 6] and segments.tolist() == [0, 2, 4, 7, 10, 10, 10]
    indices, segments, _, kept = pack_reserved(keep, None, None, slots=3)
    assert indices.tolist() == [[0, 2, 4]] and segments.tolist() == [0, 2, 3, 3] and int(kept) == 4  # more than 3


def test_packed_cache_prefill_and_decode(core_family, tiny, ids, left_pad, randomize_routers, last_keeps, packed_calls):
    """A packed prefill and packed decode steps give the full forward's logits, and the cache of a
    MoD layer holds exactly the kept (row, token) pairs: no filler slot."""
    padded, packed = _pair(tiny, core_family, randomize_routers)
    x = ids(3, 12)
    with torch.no_grad():
        full = packed(x, use_cache=False).logits
        keeps = last_keeps(packed)
        out = packed(x[:, :5], use_cache=True)
        steps, calls = [out.logits], len(packed_calls)
        for t in range(5, 9):
            out = packed(x[:, t : t + 1], **cache_kwarg(packed, returned_cache(out)), use_cache=True)
            steps.append(out.logits)
        assert len(packed_calls) > calls, "no decode step ran packed"
        torch.testing.assert_close(torch.cat(steps, 1), full[:, :9], rtol=1e-4, atol=1e-5)
        cache = returned_cache(out)
        for layer, keep in zip(modadapt.mod_layers(packed), keeps):
            held = cache.layers[layer.mod_state.index]
            if _slides(layer):  # a sliding layer's window cuts the sequence: it pads, and keeps rows
                assert held.mod_segments is None
                continue
            assert held.mod_segments is not None
            assert held.keys.shape[-2] == int(keep[:, :9].sum())  # no filler slot
        counts = [keep[:, :9].sum(1) for layer, keep in zip(modadapt.mod_layers(packed), keeps) if not _slides(layer)]
        assert any(c.max() > c.min() for c in counts), "rows keep equal counts: rows would need no filler either"
        first, keep = next((m, k) for m, k in zip(modadapt.mod_layers(packed), keeps) if not _slides(m))
        held = cache.layers[first.mod_state.index]
        index, valid = held.mod_index, held.mod_valid  # read in the rows layout: the cache converts
        assert held.mod_segments is None and index.shape == valid.shape == (3, int(keep[:, :9].sum(1).max()))
        for row in range(3):
            assert index[row][valid[row]].tolist() == keep[row, :9].nonzero()[:, 0].tolist()
        # a two-token chunk takes the padded path: the cache turns into rows first
        chunk = packed(x[:, 9:11], **cache_kwarg(packed, cache), use_cache=True).logits
        torch.testing.assert_close(chunk, full[:, 9:11], rtol=1e-4, atol=1e-5)
        assert any(cache.layers[m.mod_state.index].mod_segments is None for m in modadapt.mod_layers(packed))

        if not any(_slides(m) for m in modadapt.mod_layers(packed)):  # transformers crops no sliding layer
            cache = returned_cache(packed(x[:, :5], use_cache=True))
            for t in range(5, 8):
                packed(x[:, t : t + 1], **cache_kwarg(packed, cache), use_cache=True)
            cache.crop(-2)  # cropping needs the slots' positions
            after_crop = packed(x[:, 6:], **cache_kwarg(packed, cache), use_cache=True).logits
            torch.testing.assert_close(after_crop, full[:, 6:], rtol=1e-4, atol=1e-5)

        prompts, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (6, 3, 9)])
        expected = padded.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = packed.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False)
        beams = [
            m.generate(prompts, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
            for m in (padded, packed)
        ]
    assert torch.equal(got, expected)
    assert torch.equal(beams[1], beams[0])


def test_packing_is_off_on_cpu_by_default(tiny, ids, randomize_routers, packed_calls):
    auto = modadapt.convert(tiny("llama"), router="threshold-p", layers="all-but-first")
    randomize_routers(auto)
    with torch.no_grad():
        auto(ids(3, 8))
    assert not packed_calls, "auto packs only where a fused kernel exists (CUDA)"


def test_pack_rows_concatenates_rows_in_order():
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    forced = torch.zeros_like(keep)
    forced[1, 3] = True
    indices, segments, out = pack_rows(keep, real, forced)
    assert indices.tolist() == [[0, 2, 7, 9]]  # row 0 loses its padded token 3; row 1 its forced one
    assert segments.dtype == torch.int32 and segments.tolist() == [0, 2, 3, 4]
    assert out.sum() == 4


def test_bad_packing_value_is_a_clear_error():
    with pytest.raises(ModAdaptError, match="packing must be one of"):
        modadapt.ModConfig(packing="ragged")


def test_varlen_attention_rejects_softcap():
    from modadapt.adapters.hf.attention import transformers_varlen_attention

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ModAdaptError, match="softcap"):
        transformers_varlen_attention(
            nn.Module(),
            q,
            q,
            q,
            None,
            softcap=30.0,
            **{varlen.SEGMENTS_KWARG: torch.tensor([0, 3]), varlen.MAX_LEN_KWARG: (3, 3)},
        )


def test_speed_benchmark_smoke(tmp_path, monkeypatch):
    """`benchmarks/speed.py --tiny` runs every scenario (packed check, graphed decode) and writes records."""
    bench = _speed_bench(monkeypatch)
    records = _run_speed(bench, ["--tiny", "--routers", "topk,threshold-p"], tmp_path / "speed.json")
    scenarios = {r["scenario"].split("_b")[0] for r in records}
    assert {
        "varlen_kernel_check",
        "packed_check",
        "prefill",
        "layer",
        "decode_layer",
        "decode",
        "decode_graphs",
        "decode_speculative",
        "train",
    } <= scenarios
    priced = [r for r in records if r["scenario"].startswith("decode_layer")]
    assert {r["router"] for r in priced} == {"topk", "threshold-p"}
    assert all(r["all_skip_step_ms"] > 0 and r["all_keep_step_ms"] > 0 for r in priced)
    graphed = [r for r in records if r["scenario"].startswith("decode_graphs")]
    assert {r["router"] for r in graphed} == {"topk", "threshold-p"}
    # the graphed decoder's pieces, run eagerly on CPU, emit eager decoding's tokens
    assert all(r["dense_teacher_forced_agreement"] == r["mod_teacher_forced_agreement"] == 1.0 for r in graphed)
    assert all(r["skip_saves_us"] is not None for r in graphed if r["batch"] == 1)
    # each shape's dense step next to its bytes bound and transformers' own static-cache decoding
    assert all(r["bytes_bound_ms"] > 0 and r["copy_bandwidth_bytes_s"] > 0 and r["context"] > 0 for r in graphed)
    assert all(r["dense_vs_bound"] == pytest.approx(r["dense_ms_per_step"] / r["bytes_bound_ms"]) for r in graphed)
    assert all(r["dense_hf_static_error"] is None and r["dense_hf_static_ms"] > 0 for r in graphed)
    # every branch mode per router and shape, each emitting select mode's tokens (teacher-forced)
    from modadapt.decoding import available_branches

    branches = [r for r in records if r["scenario"].startswith("decode_branches_b") and "best" not in r]
    modes = set(available_branches()) - {"auto"}
    assert {(r["router"], r["branches"], r["batch"]) for r in branches} == {
        (router, mode, setting["batch"])
        for router in ("topk", "threshold-p")
        for mode in modes
        for setting in bench.TINY["branches"]
    }
    assert all(r["mod_ms_per_step"] > 0 and "error" not in r for r in branches)
    assert all(r["tokens_as_select"] == 1.0 for r in branches if r["branches"] != "select")
    best = [r for r in records if r["scenario"].startswith("decode_branches_best")]
    assert len(best) == 2 * len(bench.TINY["branches"]) and all(r["best"] in modes for r in best)
    assert {r["router"] for r in records if r["scenario"].startswith("decode_kv_budget")} == {
        "dense",
        "topk",
        "threshold-p",
    }
    speculative = [r for r in records if r["scenario"].startswith("decode_speculative")]
    assert {(r["router"], r["batch"]) for r in speculative} == {
        (router, b) for router in ("topk", "threshold-p") for b in (1, 2)
    }
    assert all(0 <= r["acceptance"] <= 1 and 1 <= r["tokens_per_round"] <= r["k"] + 1 for r in speculative)
    assert all(r["mod_tokens_per_s"] > 0 and r["ideal_speedup"] > 0 for r in speculative)
    for r in speculative:  # the round's cost split: K draft steps and the verification timed apart
        assert r["draft_step_ms"] > 0 and r["verify_ms"] > 0
        # batch 1 decodes the size's prompts in turn (times added up), a batch its rows at once
        assert r["prompts_in_turn"] == (2 if r["batch"] == 1 else 1)
        rows = r["prompts_in_turn"] * r["batch"]
        assert len(r["rounds"]) == len(r["accepted"]) == rows
        drafted = r["k"] * sum(r["rounds"])
        assert r["acceptance"] == pytest.approx(sum(r["accepted"]) / drafted)
        assert r["mod_tokens_per_s"] == pytest.approx(rows * (r["new_tokens"] - 1) / r["mod_ms"] * 1e3)
        assert r["dense_step_ms"] == pytest.approx(r["dense_ms"] / (r["prompts_in_turn"] * (r["new_tokens"] - 1)))
        assert r["draft_ratio"] == pytest.approx(r["draft_step_ms"] / r["dense_step_ms"])
        assert r["break_even_draft_ratio"] == pytest.approx((r["tokens_per_round"] - r["verify_ratio"]) / r["k"])
    check = next(r for r in records if r["scenario"].startswith("packed_check"))
    assert check["layer_rel_diff"] < 1e-2 and check["decode_decisions_flipped"] == {"packed": 0, "padded": 0}


def _speed_bench(monkeypatch):
    return load_benchmark("speed", monkeypatch)


def _run_speed(bench, argv: list[str], out) -> list[dict]:
    """`bench.main(argv)` writing its records to `out`, read back."""
    import json

    with threads_restored():
        assert bench.main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_speed_benchmark_kv_budget(tmp_path, monkeypatch):
    """`decode_kv_budget`: per model the largest batch whose static K/V fits the budget, and its
    tokens/s; MoD rows are smaller, so more of them fit. Then: a batch that runs out of memory is
    halved, and a batch whose real allocation exceeds the budget (here: the probe under-reports)
    steps down to the largest that fits by its rows' prompt lengths."""
    from modadapt.decoding import BUCKET, GraphedDecoder

    bench = _speed_bench(monkeypatch)
    sizes = bench.allocation_by_batch([torch.tensor([10, 300, 20]), torch.tensor([5, 5, 130])], [1, 2], 8)
    assert sizes == [(BUCKET + 2 * BUCKET) * 1, (3 * BUCKET + 2 * BUCKET) * 2, (3 * BUCKET + 4 * BUCKET) * 3]

    setting = bench.TINY["kv_budget"]
    records = _run_speed(
        bench, ["--tiny", "--scenarios", "decode_kv_budget", "--routers", "topk,threshold-p"], tmp_path / "a.json"
    )
    by = {r["router"]: r for r in records if r["scenario"] == f"decode_kv_budget_ctx{setting['context']}"}
    assert set(by) == {"dense", "topk", "threshold-p"} and not any("error" in r for r in by.values())
    budget = int(setting["budget_gib"] * 2**30)
    # tiny Llama: 4 layers, 2 K/V heads of 16; a dense layer holds 256 + 8 slots, one bucket up: 384
    assert by["dense"]["kv_bytes_per_row"] == 4 * 384 * 2 * 2 * 16 * 2
    for r in by.values():
        assert r["kv_budget_bytes"] == budget and r["kv_fits"] and 0 < r["kv_allocated_bytes"] <= budget
        if r["stepped_down_from"]:  # a MoD layer's widest row grew past the probe's bucket
            assert r["batch"] < r["estimate_batch"]
        else:  # the largest batch: one row more would not fit
            assert r["batch"] == r["estimate_batch"] == budget // r["kv_bytes_per_row"] and r["next_row_exceeds"]
            assert r["kv_allocated_bytes"] == r["batch"] * r["kv_bytes_per_row"]
        assert r["oom_batches"] == [] and (r["events"] == []) == (r["stepped_down_from"] == [])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * setting["new"] / r["ms"] * 1e3)
        assert len(r["times_ms"]) == bench.TINY["decode_repeats"]
    for router in ("topk", "threshold-p"):
        r = by[router]
        assert r["dense_batch"] == by["dense"]["batch"] and r["mod_batch"] == r["batch"]
        assert r["kv_row_ratio"] == pytest.approx(r["kv_bytes_per_row"] / by["dense"]["kv_bytes_per_row"])
        if r["kv_bytes_per_row"] < by["dense"]["kv_bytes_per_row"]:
            assert r["batch"] >= by["dense"]["batch"]
        assert r["speedup"] == pytest.approx(r["mod_tokens_per_s"] / r["dense_tokens_per_s"])
        assert r["ideal_speedup"] > 1 and 0 < r["kept_fraction"] < 1 and 0 < r["prompt_kept_fraction"] < 1
    assert by["topk"]["goal"] == 1.5 and by["topk"]["met"] == (by["topk"]["speedup"] >= 1.5)
    # topk's MoD layers keep 32 of 256 prompt tokens: one bucket, a third of a dense layer's
    assert (
        by["topk"]["kv_bytes_per_row"] == 2 * (384 + 128) * 2 * 2 * 16 * 2
        and by["topk"]["batch"] == 8 > by["dense"]["batch"] == 5
    )

    prefill, kv_bytes = GraphedDecoder.prefill, GraphedDecoder.kv_bytes

    def short_of_memory(self, input_ids, *args, **kwargs):
        if not any(layer.mod for layer in self.layers) and input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return prefill(self, input_ids, *args, **kwargs)

    def under_reported_probe(self):
        allocated, used = kv_bytes(self)
        probing = any(layer.mod for layer in self.layers) and self.last_step.batch == setting["probe_batch"]
        return (allocated * 3 // 4 if probing else allocated), used

    monkeypatch.setattr(GraphedDecoder, "prefill", short_of_memory)
    monkeypatch.setattr(GraphedDecoder, "kv_bytes", under_reported_probe)
    records = _run_speed(bench, ["--tiny", "--scenarios", "decode_kv_budget", "--routers", "topk"], tmp_path / "b.json")
    dense, topk = (next(r for r in records if r["router"] == name) for name in ("dense", "topk"))
    assert dense["oom_batches"] == [5] and dense["batch"] == 2 and "out of memory" in dense["events"][0]
    assert topk["estimate_batch"] == 10 and topk["stepped_down_from"] == [10] and topk["batch"] == 8
    assert topk["kv_allocated_bytes"] <= budget < topk["kv_allocated_bytes"] // 8 * 9
    assert topk["dense_batch"] == 2 and topk["speedup"] == pytest.approx(
        topk["mod_tokens_per_s"] / dense["tokens_per_s"]
    )


def test_speed_benchmark_speculates_with_saved_models_on_real_text(tmp_path, monkeypatch):
    """`decode_speculative --speculate-model DIR (repeated) --speculate-text FILE`: only the saved
    models are measured, named by their directory, on windows of the text in their own tokenizer."""
    import gzip
    import types

    from modadapt.cli import main as cli

    bench = _speed_bench(monkeypatch)
    for name, options in (("a", ["topk", "--capacity", "0.5", "--layers", "2"]), ("b", ["threshold-p"])):
        assert cli(["convert", "tiny-llama", "--router", *options, "-o", str(tmp_path / name / "model")]) == 0
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    with gzip.open(tmp_path / "text.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    args = types.SimpleNamespace(speculate_text=str(tmp_path / "text.txt.gz"))
    prompts = bench.speculate_prompts(
        types.SimpleNamespace(args=args, device=torch.device("cpu")), str(tmp_path / "a" / "model"), 256, 3, 20
    )
    assert prompts.shape == (3, 20) and bytes(prompts[0].tolist()).decode() == text[:20]  # tiny-llama's ids are bytes
    assert bytes(prompts[2].tolist()).decode() in text and not torch.equal(prompts[0], prompts[2])
    with pytest.raises(SystemExit, match="fewer than"):
        bench.speculate_prompts(
            types.SimpleNamespace(args=args, device=torch.device("cpu")), str(tmp_path / "a" / "model"), 256, 3, 10**6
        )
    argv = ["--tiny", "--scenarios", "decode_speculative", "--speculate-k", "2", "--speculate-context", "24"]
    for name in ("a", "b"):
        argv += ["--speculate-model", str(tmp_path / name / "model")]
    argv += ["--speculate-text", str(tmp_path / "text.txt.gz")]
    records = [
        r for r in _run_speed(bench, argv, tmp_path / "speed.json") if r["scenario"].startswith("decode_speculative")
    ]
    assert {(r["router"], r["batch"], r["context"]) for r in records} == {(n, b, 24) for n in "ab" for b in (1, 2)}
    assert all(r["same_prefix_as_dense"] == 1.0 and 0 <= r["acceptance"] <= 1 for r in records)
    # batch 1 also runs transformers' assisted decoding with the converted model as assistant
    assert all(r["hf_assisted_same_tokens"] and r["hf_assisted_ms"] > 0 for r in records if r["batch"] == 1)
    assert not any("hf_assisted_ms" in r for r in records if r["batch"] > 1)
    for name in "ab":  # the records describe the saved model, not the benchmark's own
        saved = modadapt.load(tmp_path / name / "model")
        mod_layers, layers = list(saved._modadapt_state.layer_indices), saved.config.num_hidden_layers
        facts = {"parameters": sum(p.numel() for p in modadapt.unload(saved).parameters())}
        facts.update(mod_layers=mod_layers, layers=layers)
        for r in (r for r in records if r["router"] == name):
            assert (r["parameters"], r["mod_layers"], r["model_config"]["num_hidden_layers"]) == tuple(facts.values())


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--speculate-prompts", "0", "--speculate-prompts must be >= 1"),
        ("--pack-reserve", "1.5", "expected 'auto' or a share in (0, 1]"),
        ("--pack-reserve", "most", "expected 'auto' or a share in (0, 1]"),
        ("--decode-shapes", "1x64,9x9", "--decode-shapes: 9x9 not among this size's 1x64, 4x64"),
    ],
)
def test_speed_benchmark_refuses_bad_counts_and_shares(option, value, message, monkeypatch, capsys):
    bench = _speed_bench(monkeypatch)
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--scenarios", "prefill", option, value])
    assert message in capsys.readouterr().err


def test_speed_benchmark_pack_bucket_reaches_the_models(tmp_path, monkeypatch):
    """`--pack-bucket N` and `--pack-reserve SHARE` convert the MoD models with them (what
    `--compile` prefill needs to compile once per bucket; prefill with no sync per layer) and
    every record says so; prefill records count the forwards that overflowed the reserve."""
    bench = _speed_bench(monkeypatch)
    seen = []
    make_mod = bench.make_mod

    def recording(*args, **kwargs):
        model, fraction, reached = make_mod(*args, **kwargs)
        config = modadapt.mod_layer.state_of(model).config
        seen.append((config.pack_bucket, config.pack_reserve))
        return model, fraction, reached

    monkeypatch.setattr(bench, "make_mod", recording)
    argv = [
        "--tiny",
        "--scenarios",
        "prefill",
        "--routers",
        "threshold-p",
        "--pack-bucket",
        "8",
        "--pack-reserve",
        "0.05",
    ]
    records = _run_speed(bench, argv, tmp_path / "p.json")
    assert seen == [(8, 0.05)] and records
    assert all(r["pack_bucket"] == 8 and r["pack_reserve"] == 0.05 for r in records)
    prefill = [r for r in records if r["scenario"].startswith("prefill")]
    assert prefill and all(isinstance(r["pack_reruns"], int) for r in prefill)  # off CUDA `auto` pads: 0
    assert all(r["settle_calls"] >= 3 for r in prefill)  # the three prompts once at least, untimed


def test_speed_benchmark_settles_reserves_before_timing(monkeypatch):
    """`settle_reserves` calls until as many calls in a row as asked ran without a rerun, and
    gives up after four times as many."""
    bench = _speed_bench(monkeypatch)
    state = types.SimpleNamespace(pack_reruns=0)
    reruns = iter([1, 0, 1, 0, 0, 0, 1])  # what each call adds

    def call():
        state.pack_reruns += next(reruns)

    assert bench.settle_reserves(state, call, 3) == 6
    state.pack_reruns = 0
    assert bench.settle_reserves(state, lambda: setattr(state, "pack_reruns", state.pack_reruns + 1), 2) == 8
