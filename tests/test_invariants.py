"""The invariants of DESIGN.md section 6, asserted on tiny models of every supported family.

`family` runs a test for every family the hf-decoder adapter supports; `core_family` (llama and
gpt2: RoPE with keyword calls, and learned positions with positional calls; gemma3: sliding and
global layers in one stack; mixtral: mixtures of experts) runs the expensive ones. Routers get random weights (`randomize_routers`) wherever a fresh, keep-everything router
would make the invariant trivially true; each such test also checks that routing really skipped.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import SAVED_FILES, beam_search_scored, lm_loss, sampled_rows_match_recompute
from torch import nn
from transformers import DynamicCache

import modadapt
from modadapt.adapters.hf.versions import cache_kwarg, returned_cache
from modadapt.mod_layer import state_of
from modadapt.plugins import find_adapter

# Routers whose decisions are causal in eval mode (so prefill + decode equal one full forward).
CAUSAL_ROUTERS = {
    "threshold-p": dict(router="threshold-p"),
    "topk-aux": dict(router="topk", capacity=0.5),
    "topk-predictor": dict(router="topk", capacity=0.5, router_kwargs={"causal_rule": "predictor"}),
    "random": dict(router="random", capacity=0.5),
}


def _convert(model, randomize, *, scale: float = 1.0, seed: int = 0, **config):
    modadapt.convert(model, **config)
    if config.get("router") != "random":
        randomize(model, scale=scale, seed=seed)
    return model


def _assert_mixed_routing(model, real: torch.Tensor | None = None):
    """Routing kept some tokens and skipped some (otherwise the invariant under test is trivial)."""
    kept = skipped = 0
    for layer in modadapt.mod_layers(model):
        keep = layer.mod_state.last_keep
        mask = real.bool() if real is not None else torch.ones_like(keep)
        kept += int((keep & mask).sum())
        skipped += int((~keep & mask).sum())
    assert kept > 0 and skipped > 0, f"routing is not mixed: kept {kept}, skipped {skipped}"


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _layer_io_recorder(model):
    """Record (input hidden, output hidden, keep) of every MoD layer call."""
    records = []

    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        records.append((hidden_in.detach().clone(), hidden_out.detach().clone(), module.mod_state.last_keep.clone()))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in modadapt.mod_layers(model)]
    return records, handles


# --- 1. full capacity equals the dense model -------------------------------------------------


EVAL_FULL = {
    "topk-1.0": dict(router="topk", capacity=1.0),
    "topk-1.0-topk-inference": dict(router="topk", capacity=1.0, inference_routing="topk"),
    "topk-predictor-1.0": dict(router="topk", capacity=1.0, router_kwargs={"causal_rule": "predictor"}),
    "threshold-p-fresh": dict(router="threshold-p"),
    "threshold-p-fresh-p0.4": dict(router="threshold-p", router_kwargs={"p": 0.4}),
    "random-1.0": dict(router="random", capacity=1.0),
}


@pytest.mark.parametrize("config", list(EVAL_FULL.values()), ids=list(EVAL_FULL))
def test_full_capacity_equals_dense_eval(family, tiny, ids, config):
    model = tiny(family)
    x = ids(2, 12)
    with torch.no_grad():
        dense = model(x).logits
        modadapt.convert(model, **config)
        converted = model(x).logits
    assert torch.equal(converted, dense)
    assert all(row["kept_fraction"] == 1.0 for row in modadapt.routing_stats(model))


@pytest.mark.parametrize(
    "config",
    [
        dict(router="topk", capacity=1.0),
        dict(router="threshold-p"),
        dict(router="threshold-p", router_kwargs={"alpha": 0.5}),
    ],
    ids=["topk-1.0", "threshold-p-fresh", "threshold-p-alpha0.5"],
)
def test_full_capacity_equals_dense_train(family, tiny, ids, config):
    model = tiny(family).train()
    x = ids(2, 12)
    torch.manual_seed(1)  # the same dropout draws in both runs (gpt2)
    dense = model(x).logits.detach()
    modadapt.convert(model, **config)
    torch.manual_seed(1)
    converted = model(x).logits.detach()
    assert torch.equal(converted, dense)
    assert all(row["kept_fraction"] == 1.0 for row in modadapt.routing_stats(model))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_fresh_threshold_router_equals_dense_in_bfloat16(tiny, ids, p):
    """Rounding the bias to bf16 must not make a fresh router skip tokens."""
    model = tiny("llama").to(torch.bfloat16)
    x = ids(2, 12)
    with torch.no_grad():
        dense = model(x).logits
        modadapt.convert(model, router="threshold-p", router_kwargs={"p": p})
        converted = model(x).logits
    assert torch.equal(converted, dense)
    assert all(row["kept_fraction"] == 1.0 for row in modadapt.routing_stats(model))


def test_full_capacity_equals_dense_with_padding(core_family, tiny, left_pad, ids):
    """With padding the MoD layer builds its own mask; real positions still match the dense model."""
    prompts = [ids(1, n, seed=n)[0] for n in (5, 9)]
    x, mask, pos = left_pad(prompts)
    model = tiny(core_family)
    with torch.no_grad():
        dense = model(x, attention_mask=mask, position_ids=pos).logits
        modadapt.convert(model, router="topk", capacity=1.0)
        converted = model(x, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(converted[real], dense[real], rtol=0, atol=1e-5)


# --- 2. skipped tokens are bit-identical across a MoD layer ---------------------------------


@pytest.mark.parametrize("case", ["topk-0.25-train", "threshold-p-eval", "random-eval-padded"])
def test_skipped_tokens_are_bit_identical(family, tiny, ids, left_pad, randomize_routers, case):
    model = tiny(family)
    kwargs = {}
    if case == "topk-0.25-train":
        _convert(model, randomize_routers, router="topk", capacity=0.25)
        model.train()
        x = ids(2, 16)
    elif case == "threshold-p-eval":
        _convert(model, randomize_routers, router="threshold-p")
        x = ids(2, 16)
    else:
        modadapt.convert(model, router="random", capacity=0.5)
        x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (7, 12)])
        kwargs = dict(attention_mask=mask, position_ids=pos)
    records, handles = _layer_io_recorder(model)
    try:
        out = model(x, **kwargs)
        assert torch.isfinite(out.logits).all()
    finally:
        for handle in handles:
            handle.remove()
    assert len(records) == len(modadapt.mod_layers(model))
    for hidden_in, hidden_out, keep in records:
        assert hidden_out.shape == hidden_in.shape
        assert (~keep).any() and keep.any()
        assert torch.equal(hidden_out[~keep], hidden_in[~keep])
        # the recorder sees the real layer: kept tokens do change
        assert not torch.equal(hidden_out[keep], hidden_in[keep])
    if "padded" in case:
        real = kwargs["attention_mask"].bool()
        for _, _, keep in records:
            assert not keep[~real].any(), "a padding token was processed"


def test_skipped_tokens_bit_identical_while_decoding(core_family, tiny, ids, randomize_routers):
    model = _convert(tiny(core_family), randomize_routers, router="threshold-p")
    records, handles = _layer_io_recorder(model)
    try:
        with torch.no_grad():
            model.generate(ids(2, 6), max_new_tokens=6, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert len(records) == 6 * len(modadapt.mod_layers(model))  # prefill + 5 decode steps, per layer
    skipped_somewhere = False
    for hidden_in, hidden_out, keep in records:
        assert torch.equal(hidden_out[~keep], hidden_in[~keep])
        skipped_somewhere |= bool((~keep).any())
    assert skipped_somewhere


def test_hidden_states_skip_identity(core_family, tiny, ids, randomize_routers):
    """Through the public API: the hidden state after MoD layer 1 equals its input where skipped."""
    model = _convert(tiny(core_family), randomize_routers, router="threshold-p", layers=[1, 3])
    with torch.no_grad():
        out = model(ids(2, 12), output_hidden_states=True)
    keep = modadapt.mod_layers(model)[0].mod_state.last_keep
    assert (~keep).any()
    assert torch.equal(out.hidden_states[2][~keep], out.hidden_states[1][~keep])


# --- 3. cached generation equals full recompute -------------------------------------------


def _check_generate_matches_recompute(model, prompt, steps=8):
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = model(out.sequences).logits
    assert len(out.logits) == steps
    start = prompt.shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, start + step], rtol=0, atol=1e-5)
    # greedy: each generated token is the argmax of the recomputed logits
    assert torch.equal(out.sequences[:, prompt.shape[1] :], full[:, start:-1].argmax(-1))
    return out


@pytest.mark.parametrize("router", list(CAUSAL_ROUTERS))
def test_generate_equals_full_recompute(core_family, tiny, ids, randomize_routers, router):
    model = _convert(tiny(core_family), randomize_routers, **CAUSAL_ROUTERS[router])
    out = _check_generate_matches_recompute(model, ids(2, 10))
    with torch.no_grad():
        model(out.sequences)
    _assert_mixed_routing(model)


def test_generate_equals_full_recompute_every_family(family, tiny, ids, randomize_routers):
    model = _convert(tiny(family), randomize_routers, router="threshold-p")
    out = _check_generate_matches_recompute(model, ids(1, 10), steps=6)
    with torch.no_grad():
        model(out.sequences)
    _assert_mixed_routing(model)


@pytest.mark.parametrize("router", ["threshold-p", "topk-aux", "random"])
def test_manual_prefill_and_decode_equal_full_forward(core_family, tiny, ids, randomize_routers, router):
    """Prefill, a 3-token chunk, then one token at a time (teacher forced), two rows that disagree."""
    model = _convert(tiny(core_family), randomize_routers, **CAUSAL_ROUTERS[router])
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x).logits
        full_keeps = [k.clone() for k in (layer.mod_state.last_keep for layer in modadapt.mod_layers(model))]
        cache = DynamicCache(config=model.config)
        chunks = [(0, 8), (8, 11)] + [(i, i + 1) for i in range(11, 16)]
        step_keeps = []
        for a, b in chunks:
            out = model(x[:, a:b], **cache_kwarg(model, cache), use_cache=True)
            cache = returned_cache(out)
            torch.testing.assert_close(out.logits, full[:, a:b], rtol=0, atol=1e-5)
            step_keeps.append([layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)])
    # the decisions made step by step are the decisions of the full forward
    for i, full_keep in enumerate(full_keeps):
        assert torch.equal(torch.cat([keeps[i] for keeps in step_keeps], dim=1), full_keep)
        assert (~full_keep).any() and full_keep.any()
    assert cache.get_seq_length() == 16


def _window(cache_layer) -> int | None:
    """The sliding window of a transformers cache layer (None: it keeps every token)."""
    return cache_layer.sliding_window if getattr(cache_layer, "is_sliding", False) else None


def test_skipped_tokens_write_no_kv(core_family, tiny, ids, randomize_routers):
    """A MoD layer's cache holds only the tokens it processed; a dense layer's holds all (a
    sliding layer: the last `window - 1`). A sliding MoD layer holds every kept token still in
    reach, whichever slots the other row fills."""
    model = _convert(tiny(core_family), randomize_routers, router="threshold-p")
    x = ids(2, 12)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(x, **cache_kwarg(model, cache), use_cache=True)
    window0 = _window(cache.layers[0])
    assert cache.layers[0].keys.shape[-2] == (12 if window0 is None else min(12, window0 - 1))
    for layer in modadapt.mod_layers(model):
        index = layer.mod_state.index
        keep = layer.mod_state.last_keep
        book = cache.layers[index]
        window = _window(book)
        slots = book.keys.shape[-2]
        assert slots <= int(keep.sum(1).max()) < 12
        for row in range(2):
            kept = set(keep[row].nonzero()[:, 0].tolist())
            valid = book.mod_valid[row] if book.mod_valid is not None else torch.ones(slots, dtype=torch.bool)
            held = book.mod_index[row][valid].tolist()
            assert len(held) == len(set(held)) and set(held) <= kept
            if window is None:
                assert slots == int(keep.sum(1).max()) and set(held) == kept
            else:
                assert {i for i in kept if i > 12 - window} <= set(held)
        if window is not None and slots:  # the slots out of reach are dropped
            assert ((book.mod_index[:, 0] > 12 - window) & book.mod_valid[:, 0]).any()


@pytest.mark.parametrize("gate", ["straight-through", "sigmoid"])
def test_single_sequence_decode_fast_path(core_family, tiny, ids, randomize_routers, monkeypatch, gate):
    """Batch 1, one token a step: the fast path (no gather / mask / scatter) gives the full
    forward's logits and decisions, and a skipped step writes no K/V. A sliding layer takes it
    while the window holds the whole sequence."""
    from modadapt import mod_layer

    taken = []
    fast = mod_layer._decode_one_token
    monkeypatch.setattr(mod_layer, "_decode_one_token", lambda *a: taken.append(1) or fast(*a))
    model = _convert(tiny(core_family), randomize_routers, router="threshold-p", router_kwargs={"gate": gate})
    x = ids(1, 14)
    with torch.no_grad():
        full = model(x).logits
        full_keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        out = model(x[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, 14):
            out = model(x[:, t : t + 1], **cache_kwarg(model, returned_cache(out)), use_cache=True)
            steps.append(out.logits)
    windows = [layer.mod_state.call.window for layer in modadapt.mod_layers(model)]
    assert len(taken) == sum(sum(w is None or t + 1 <= w for t in range(6, 14)) for w in windows)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    for layer, keep, window in zip(modadapt.mod_layers(model), full_keeps, windows):
        held = returned_cache(out).layers[layer.mod_state.index]
        kept = [i for i in keep[0].nonzero()[:, 0].tolist() if window is None or i > 14 - window]
        assert held.keys.shape[-2] == len(kept) and held.mod_index[0].tolist() == kept
    assert any(keep[0, 6:].any() and not keep[0, 6:].all() for keep in full_keeps)  # steps kept and skipped
    if any(_window(layer) for layer in returned_cache(out).layers):
        return  # transformers crops no sliding layer past its window
    with torch.no_grad():  # positions recorded by the fast path survive a crop
        cache = returned_cache(model(x[:, :6], use_cache=True))
        for t in range(6, 12):
            model(x[:, t : t + 1], **cache_kwarg(model, cache), use_cache=True)
        cache.crop(-4)
        again = model(x[:, 8:], **cache_kwarg(model, cache), use_cache=True).logits
    torch.testing.assert_close(again, full[:, 8:], rtol=0, atol=1e-5)


def test_cache_crop_then_decode_equals_full_forward(core_family, tiny, ids, randomize_routers):
    model = _convert(tiny(core_family), randomize_routers, router="threshold-p")
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "layer_types", None):
        pytest.skip("transformers crops no sliding-window cache layer past its window")
    x = ids(2, 14)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        model(x[:, :12], **cache_kwarg(model, cache), use_cache=True)
        cache.crop(-3)
        assert cache.get_seq_length() == 9
        out = model(x[:, 9:], **cache_kwarg(model, cache), use_cache=True)
    torch.testing.assert_close(out.logits, full[:, 9:], rtol=0, atol=1e-5)


def test_training_forward_keeps_a_cache_it_is_given(core_family, tiny, ids, randomize_routers):
    """A training forward turns the KV cache off only when none is passed, whatever the model
    calls its cache argument (`cache` from transformers 5.24, `past_key_values` before)."""
    from modadapt.adapters.hf.versions import cache_argument

    model = _convert(tiny(core_family), randomize_routers, router="threshold-p").train()
    cache = DynamicCache(config=model.config)
    out = model(ids(2, 8), **{cache_argument(model.forward): cache})
    assert returned_cache(out) is cache and cache.get_seq_length() == 8
    assert returned_cache(model(ids(2, 8))) is None  # none given: none built


def test_eager_attention_matches_sdpa(core_family, tiny, ids, left_pad, randomize_routers):
    """MoD masks are built for both kernels: same logits, with padding and a cache."""
    model = _convert(tiny(core_family), randomize_routers, router="threshold-p")
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (9, 14)])
    real = mask.bool()
    with torch.no_grad():
        sdpa = model(x, attention_mask=mask, position_ids=pos).logits
        model.set_attn_implementation("eager")
        eager = model(x, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(eager[real], sdpa[real], rtol=0, atol=1e-5)
        cache = DynamicCache(config=model.config)
        model(
            x[:, :10],
            attention_mask=mask[:, :10],
            position_ids=pos[:, :10],
            **cache_kwarg(model, cache),
            use_cache=True,
        )
        out = model(
            x[:, 10:], attention_mask=mask, position_ids=pos[:, 10:], **cache_kwarg(model, cache), use_cache=True
        )
    torch.testing.assert_close(out.logits, sdpa[:, 10:], rtol=0, atol=1e-5)


# --- 4. a left-padded batch equals each prompt alone --------------------------------------


@pytest.mark.parametrize("router", ["threshold-p", "topk-aux", "random"])
def test_left_padded_batch_equals_each_prompt_alone(core_family, tiny, ids, left_pad, randomize_routers, router):
    model = _convert(tiny(core_family), randomize_routers, **CAUSAL_ROUTERS[router])
    prompts = [ids(1, n, seed=n)[0] for n in (5, 11, 8)]
    x, mask, pos = left_pad(prompts)
    width = x.shape[1]
    real = mask.bool()
    with torch.no_grad():
        batched = model(x, attention_mask=mask, position_ids=pos).logits
        batch_keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        stats = modadapt.routing_stats(model)
        _assert_mixed_routing(model, real)
        generated = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)

        kept_alone = [0] * len(batch_keeps)
        for row, prompt in enumerate(prompts):
            start = width - len(prompt)
            alone = model(prompt[None]).logits[0]
            torch.testing.assert_close(batched[row, start:], alone, rtol=0, atol=1e-5)
            for i, layer in enumerate(modadapt.mod_layers(model)):
                assert torch.equal(batch_keeps[i][row, start:], layer.mod_state.last_keep[0])
                kept_alone[i] += int(layer.mod_state.last_keep.sum())
            alone_generated = model.generate(prompt[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(generated[row, width:], alone_generated[0, len(prompt) :])

    # padding is never kept, and never counted
    for keep in batch_keeps:
        assert not keep[~real].any()
    for i, row in enumerate(stats):
        assert row["tokens"] == int(mask.sum())
        assert row["kept_tokens"] == kept_alone[i] == int(batch_keeps[i][real].sum())
        assert row["kept_fraction"] == pytest.approx(kept_alone[i] / int(mask.sum()))


@pytest.mark.parametrize("mode", ["train", "eval-topk"])
def test_left_padded_batch_topk_selection_equals_alone(core_family, tiny, ids, left_pad, randomize_routers, mode):
    """The static top-k path (training, or eval with inference_routing='topk') with padding."""
    config = dict(router="topk", capacity=0.5)
    if mode == "eval-topk":
        config["inference_routing"] = "topk"
    model = _no_dropout(_convert(tiny(core_family), randomize_routers, **config))
    if mode == "train":
        model.train()
    prompts = [ids(1, n, seed=n)[0] for n in (5, 9, 7)]
    x, mask, pos = left_pad(prompts)
    width = x.shape[1]
    with torch.no_grad():
        batched = model(x, attention_mask=mask, position_ids=pos).logits
        batch_keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        for row, prompt in enumerate(prompts):
            start = width - len(prompt)
            alone = model(prompt[None]).logits[0]
            for i, layer in enumerate(modadapt.mod_layers(model)):
                assert torch.equal(batch_keeps[i][row, start:], layer.mod_state.last_keep[0])
            torch.testing.assert_close(batched[row, start:], alone, rtol=0, atol=1e-5)
    real = mask.bool()
    for keep in batch_keeps:
        assert not keep[~real].any()


@pytest.mark.parametrize(
    "capacity, lengths",
    [(0.1, (6, 11)), (0.27, (25, 20))],
    ids=["short-row-keeps-extra", "full-row-keeps-extra"],
)
def test_left_padded_batch_topk_keeps_what_alone_keeps(tiny, ids, left_pad, randomize_routers, capacity, lengths):
    model = _convert(tiny("llama"), randomize_routers, router="topk", capacity=capacity).train()
    prompts = [ids(1, n, seed=n)[0] for n in lengths]
    x, mask, pos = left_pad(prompts)
    width = x.shape[1]
    with torch.no_grad():
        model(x, attention_mask=mask, position_ids=pos)
        batch_keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        for row, prompt in enumerate(prompts):
            model(prompt[None])
            for i, layer in enumerate(modadapt.mod_layers(model)):
                alone = layer.mod_state.last_keep[0]
                assert int(alone.sum()) == -(-len(prompt) * round(capacity * 100) // 100)
                assert torch.equal(batch_keeps[i][row, width - len(prompt) :], alone)


# --- 5. persistence and unload --------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(router="topk", capacity=0.5, router_kwargs={"causal_rule": "predictor", "predictor_hidden": 8}),
        dict(router="threshold-p", layers="all-but-first", router_kwargs={"p": 0.4, "alpha": 0.1}),
        dict(router="random", capacity=0.3, layers=[3], router_kwargs={"seed": 7}),
    ],
    ids=["topk-predictor", "threshold-p", "random"],
)
def test_save_load_reproduces_outputs(core_family, tiny, ids, left_pad, randomize_routers, tmp_path, config):
    model = _convert(tiny(core_family), randomize_routers, **config)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (6, 10)])
    with torch.no_grad():
        expected = model(x, attention_mask=mask, position_ids=pos).logits
        expected_keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
    saved = modadapt.save(model, tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == SAVED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary directory left behind

    loaded = modadapt.load(tmp_path / "saved")
    assert not loaded.training
    assert type(loaded) is type(model)
    assert [type(layer) for layer in modadapt.mod_layers(loaded)] == [
        type(layer) for layer in modadapt.mod_layers(model)
    ]
    assert state_of(loaded).config.to_dict() == {
        **state_of(model).config.to_dict(),
        "layers": state_of(model).layer_indices,
    }
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    with torch.no_grad():
        got = loaded(x, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(got, expected)
    for layer, keep in zip(modadapt.mod_layers(loaded), expected_keeps):
        assert torch.equal(layer.mod_state.last_keep, keep)
    with torch.no_grad():
        a = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = loaded.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tied_family", ["llama-tied", "gemma3"])
def test_save_load_keeps_tied_embeddings(tied_family, tiny, ids, randomize_routers, tmp_path):
    """Input and output embeddings tied (Llama 3.2, Gemma): saved once, tied again after load, and
    a training step moves both as one."""
    model = _convert(tiny(tied_family), randomize_routers, router="threshold-p")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    x = ids(2, 10)
    with torch.no_grad():
        expected = model(x).logits
    modadapt.save(model, tmp_path / "tied")
    from safetensors import safe_open

    with safe_open(tmp_path / "tied" / "model.safetensors", "pt") as saved:
        names = list(saved.keys())
    assert sum(name.endswith(("embed_tokens.weight", "lm_head.weight")) for name in names) == 1
    loaded = modadapt.load(tmp_path / "tied")
    head, embed = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert head is embed
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    loaded.train()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(x, labels=x).loss.backward()
    optimizer.step()
    assert head is embed and not torch.equal(embed, model.get_input_embeddings().weight)


def test_save_load_keeps_dtype(tiny, ids, randomize_routers, tmp_path):
    model = _convert(tiny("llama").to(torch.bfloat16), randomize_routers, router="threshold-p")
    x = ids(1, 10)
    with torch.no_grad():
        expected = model(x).logits
    modadapt.save(model, tmp_path / "bf16")
    loaded = modadapt.load(tmp_path / "bf16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


def test_unload_restores_original_model(core_family, tiny, ids, randomize_routers):
    model = tiny(core_family)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    _, stack = find_adapter(model).layer_stack(model)
    original_classes = [type(layer) for layer in stack]
    x = ids(2, 10)
    with torch.no_grad():
        dense = model(x).logits
    # after a forward: transformers installs its output-recording hooks on the first one
    hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    _convert(model, randomize_routers, router="threshold-p", layers="all-but-first")
    with torch.no_grad():
        routed = model(x).logits
    assert not torch.equal(routed, dense)
    assert set(model.state_dict()) > set(original_state)
    new_keys = set(model.state_dict()) - set(original_state)
    assert all(".router." in key for key in new_keys)

    assert modadapt.unload(model) is model
    state = model.state_dict()
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[k], original_state[k]) for k in state)
    assert [type(layer) for layer in stack] == original_classes
    assert not any(hasattr(layer, "router") or hasattr(layer, "mod_state") for layer in stack)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hook_counts
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
    with pytest.raises(modadapt.ModAdaptError):
        modadapt.mod_layers(model)

    # converting again works, and gives the same routed model
    _convert(model, randomize_routers, router="threshold-p", layers="all-but-first")
    with torch.no_grad():
        assert torch.equal(model(x).logits, routed)


def test_deepcopy_of_converted_model_is_independent(tiny, ids, randomize_routers):
    model = _convert(tiny("llama"), randomize_routers, router="threshold-p")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in modadapt.mod_layers(twin):
            layer.router.scorer.weight.neg_()
        x = ids(2, 12)
        before = model(x).logits
        model_keeps = [k.clone() for k in (layer.mod_state.last_keep for layer in modadapt.mod_layers(model))]
        twin(x)
        after = model(x).logits
    assert torch.equal(before, after)
    for layer, keep in zip(modadapt.mod_layers(twin), model_keeps):
        assert not torch.equal(layer.mod_state.last_keep, keep)  # the twin records its own decisions


# --- 6. gradients and auxiliary losses ------------------------------------------------------


GRAD_ROUTERS = {
    "topk-aux": dict(router="topk", capacity=0.5, router_kwargs={"aux_coef": 0.1}),
    "threshold-p-alpha": dict(router="threshold-p", router_kwargs={"alpha": 0.1}),
    "topk-predictor": dict(router="topk", capacity=0.5, router_kwargs={"causal_rule": "predictor"}),
}


@pytest.mark.parametrize("router", list(GRAD_ROUTERS))
def test_gradients_reach_every_router_parameter(family, tiny, ids, randomize_routers, router):
    model = _convert(tiny(family), randomize_routers, **GRAD_ROUTERS[router]).train()
    x = ids(2, 12)
    out = model(x, labels=x)
    aux = out.router_aux_loss
    assert aux is not None and aux.ndim == 0 and torch.isfinite(aux) and aux != 0
    assert torch.equal(modadapt.aux_loss(model), aux)
    # A mixture of experts adds its own load-balancing loss (over the kept tokens), reported apart.
    experts = model.config.router_aux_loss_coef * out.aux_loss if out.get("aux_loss") is not None else 0.0
    torch.testing.assert_close(out.loss, lm_loss(out.logits, x) + aux + experts, rtol=0, atol=1e-5)
    for layer in modadapt.mod_layers(model):
        assert layer.mod_state.last_aux is not None and torch.isfinite(layer.mod_state.last_aux)
    out.loss.backward()
    router_params = [(n, p) for n, p in model.named_parameters() if ".router." in n]
    expected = 2 * len(modadapt.mod_layers(model)) + (
        4 * len(modadapt.mod_layers(model)) if "predictor" in router else 0
    )
    assert len(router_params) == expected
    for name, param in router_params:
        assert param.requires_grad
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_router_aux_loss_is_always_an_attribute(tiny, ids):
    """`out.router_aux_loss` answers on every output (None in eval mode, the loss without labels)
    and is a key only when it was added to the loss, so `to_tuple()` keeps the model's layout."""
    dense = tiny("llama")
    x = ids(2, 10)
    with torch.no_grad():
        dense_out = dense.eval()(x)
    model = modadapt.convert(dense, router="topk", capacity=0.5)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.router_aux_loss is None and list(out.keys()) == list(dense_out.keys())
    out = model.train()(x)
    assert torch.equal(out.router_aux_loss, modadapt.aux_loss(model)) and "router_aux_loss" not in out.keys()
    assert "router_aux_loss" in model(x, labels=x).keys()


def test_aux_loss_only_while_training(tiny, ids, randomize_routers):
    model = _convert(tiny("llama"), randomize_routers, router="topk", capacity=0.5)
    x = ids(2, 10)
    with torch.no_grad():
        out = model(x, labels=x)
    assert out.get("router_aux_loss") is None
    assert modadapt.aux_loss(model) is None
    torch.testing.assert_close(out.loss, lm_loss(out.logits, x), rtol=0, atol=1e-6)
    model.train()
    with torch.no_grad():  # no gradients: no training-time auxiliary loss either
        model(x, labels=x)
    assert modadapt.aux_loss(model) is None


def test_aux_loss_is_from_the_last_forward(tiny, ids, randomize_routers):
    model = _convert(tiny("llama"), randomize_routers, router="threshold-p", router_kwargs={"alpha": 0.1}).train()
    model(ids(2, 10), labels=ids(2, 10))
    assert modadapt.aux_loss(model) is not None
    model.eval()
    with torch.no_grad():
        model(ids(2, 10))
    assert modadapt.aux_loss(model) is None  # a stale training loss is never reported


def test_tuple_output_loss_includes_aux_loss(tiny, ids, randomize_routers):
    model = _convert(tiny("llama"), randomize_routers, router="topk", capacity=0.5).train()
    x = ids(2, 10)
    loss = model(x, labels=x, return_dict=False)[0]
    aux = modadapt.aux_loss(model)
    assert aux is not None
    logits = model(x, labels=x).logits
    torch.testing.assert_close(loss, lm_loss(logits, x) + modadapt.aux_loss(model), rtol=0, atol=1e-5)


# --- 7. hidden states and gradient checkpointing --------------------------------------------


def test_output_hidden_states_shapes_equal_dense(family, tiny, ids, left_pad, randomize_routers):
    model = tiny(family)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (6, 11)])
    with torch.no_grad():
        dense = model(x, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        _convert(model, randomize_routers, router="threshold-p")
        routed = model(x, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    assert len(routed) == len(dense) == model.config.num_hidden_layers + 1
    assert [h.shape for h in routed] == [h.shape for h in dense]
    assert torch.equal(routed[0], dense[0])


@pytest.mark.parametrize("router", ["topk", "threshold-p"])
def test_gradient_checkpointing_gives_same_loss_and_grads(core_family, tiny, ids, randomize_routers, router):
    config = (
        dict(router=router, capacity=0.5) if router == "topk" else dict(router=router, router_kwargs={"alpha": 0.1})
    )
    model = _convert(tiny(core_family), randomize_routers, **config).train()
    x = ids(2, 12)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = model(x, labels=x)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = step()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)
    assert all(grads_ckpt[n].abs().sum() > 0 for n in grads_ckpt if ".router." in n)
    # and one optimiser step trains
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    optimizer.step()
    new_loss, _ = step()
    assert torch.isfinite(new_loss) and new_loss != loss_ckpt


# --- 8. every family converts, trains and generates ----------------------------------------


def test_family_converts_trains_and_generates(family, tiny, ids, randomize_routers):
    model = _convert(tiny(family), randomize_routers, router="topk", capacity=0.5, scale=0.1)
    assert [layer.mod_state.index for layer in modadapt.mod_layers(model)] == [1, 3]
    model.train()
    x = ids(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(4):
        optimizer.zero_grad()
        out = model(x, labels=x)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                if ".router." in name:
                    assert param.grad is not None and param.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    stats = modadapt.routing_stats(model)
    assert [row["kept_tokens"] for row in stats] == [4 * 8, 4 * 8]  # top-k keeps ceil(0.5 * 16) per row

    model.eval()
    with torch.no_grad():
        generated = model.generate(ids(2, 5), max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)
    assert torch.equal(generated[:, :5], ids(2, 5))


def test_trainer_trains_a_converted_model(core_family, tiny, ids, randomize_routers, tmp_path):
    model = _convert(tiny(core_family), randomize_routers, router="topk", capacity=0.5, scale=0.1)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids(8, 16, seed=5)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(loss)) for loss in logged)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before[n]) for n in before), "Trainer did not update the routers"
    assert modadapt.mod_layers(model)  # still converted


# --- 9. beam search and several return sequences -------------------------------------------


@pytest.mark.parametrize("router", ["threshold-p", "topk-aux"])
def test_beam_search_scores_match_recompute(core_family, tiny, ids, randomize_routers, router):
    """Beam reordering moves the MoD bookkeeping with K/V: each beam's score is its recomputed log-prob."""
    model = _convert(tiny(core_family), randomize_routers, **CAUSAL_ROUTERS[router])
    out = beam_search_scored(model, ids(2, 7), 6)
    assert out.sequences.shape == (4, 13)
    assert not torch.equal(out.sequences[0], out.sequences[1])


@pytest.mark.parametrize("router", ["threshold-p", "random"])
def test_sampling_several_sequences_matches_recompute(core_family, tiny, ids, left_pad, randomize_routers, router):
    """num_return_sequences expands the batch; each row's step logits equal the row recomputed alone."""
    model = _convert(tiny(core_family), randomize_routers, **CAUSAL_ROUTERS[router])
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (5, 8)])
    out = sampled_rows_match_recompute(model, x, mask, 6, seed=11)
    width = x.shape[1]
    assert out.sequences.shape == (4, width + 6)
    assert not torch.equal(out.sequences[0, width:], out.sequences[1, width:])


def test_save_load_keeps_the_attention_kernel(tiny, randomize_routers, tmp_path):
    """The kernel is saved with the model: Gemma 2 runs eager (soft-capped attention), and a
    transformers whose default is SDPA for it (5.17, which then ignores the cap) must not change it."""
    for family, kernel in (("gemma2", "eager"), ("llama", "sdpa")):
        model = _convert(tiny(family), randomize_routers, router="threshold-p")
        modadapt.save(model, tmp_path / family)
        assert modadapt.load(tmp_path / family).config._attn_implementation == kernel
    model = modadapt.convert(tiny("llama"), router="attention")  # probed: the kernel it observes is saved
    modadapt.save(model, tmp_path / "probed")
    assert modadapt.load(tmp_path / "probed").config._attn_implementation == "modadapt_probe"
    assert (
        json.loads((tmp_path / "probed" / "modadapt.json").read_text())["architecture"]["attn_implementation"] == "sdpa"
    )
