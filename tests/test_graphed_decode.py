"""`GraphedDecoder` (static per-row compacted cache, one step per graph replay) generates what
`model.generate` generates. On CPU the step's pieces run eagerly (same code; the branch a MoD
layer's work takes is checked on the host); `test_captured_graphs_match_generate_on_cuda` checks
the captured graphs on a GPU, and `benchmarks/speed.py --scenarios decode_graphs` checks them at
full size (teacher-forced tokens against eager decoding)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    GRAPHED_FAMILIES,
    WINDOWED_FAMILIES,
    build_tiny,
    build_windowed,
    counting_compiles,
    cuda_prompts,
    flash_and_fallback,
    greedy,
    routed,
    sampling_is_seeded,
    stops_at_end_of_sequence,
    widened,
)

import modadapt
from modadapt.adapters.hf.presets import DECODER_FAMILIES
from modadapt.decoding import BUCKET, GraphedDecoder, available_branches
from modadapt.errors import ModAdaptError
from modadapt.mod_layer import state_of

#: Every graphed family with a window out of reach (`conftest.widened`), then every family that
#: has a sliding window with a window of 8 (`conftest.build_windowed`) that prompt and new tokens
#: pass: (family, window).
FAMILY_CASES = [pytest.param(f, None, id=f) for f in GRAPHED_FAMILIES] + [
    pytest.param(f, 8, id=f"{f}-window8") for f in WINDOWED_FAMILIES
]


def test_every_family_with_a_sliding_window_is_tested_with_one():
    """`conftest.WINDOWED_FAMILIES` names every graphed family whose config has a sliding window,
    and each one's windowed tiny model has the window where the adapter says (`DecodeParts.windows`):
    in every layer, or in the sliding layers of a mix."""
    from modadapt.plugins import find_adapter

    has_window = {f for f in GRAPHED_FAMILIES if hasattr(build_tiny(f).config, "sliding_window")}
    assert has_window == set(WINDOWED_FAMILIES)
    for family in WINDOWED_FAMILIES:
        model = build_windowed(family, 8)
        windows = find_adapter(model).decode_parts(model).windows
        assert windows in ((8, 8, 8, 8), (8, 8, None, None)), family
        assert find_adapter(model).decode_parts(widened(model)).windows[0] == 64
    assert find_adapter(build_tiny("llama")).decode_parts(build_tiny("llama")).windows == (None,) * 4


def test_every_family_the_adapter_graphs_is_tested_here():
    """The adapter's `GRAPHED_FAMILIES` (model types) and the tiny models tested here name the same
    families: a family the decoder gains is tested, and none tested here is refused."""
    from modadapt.adapters.hf.decoder import GRAPHED_FAMILIES as SUPPORTED

    tested = {build_tiny(f).config.get_text_config(decoder=True).model_type for f in GRAPHED_FAMILIES}
    assert tested == set(SUPPORTED)


@pytest.mark.parametrize("graphed_family, window", FAMILY_CASES)
def test_graphed_decoder_matches_generate_converted(graphed_family, window, ids, left_pad):
    model = routed(build_windowed(graphed_family, window))
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    new = 10 if window is None else 24
    expected = greedy(model, x, mask, new)
    decoder = GraphedDecoder(model)
    got = decoder.generate(x, attention_mask=mask, max_new_tokens=new)
    assert torch.equal(got, expected)
    gathered = GraphedDecoder(model, branches="gather")  # the family's layer on gathered rows
    assert torch.equal(gathered.generate(x, attention_mask=mask, max_new_tokens=new), expected)
    # rows really disagree while decoding: some MoD layer keeps a different number of new tokens per row
    step = decoder.prefill(x, mask, new)
    mod = state_of(model).layer_indices
    start = torch.stack([step.lengths[i].clone() for i in mod])
    decoder.decode(new - 1)
    added = torch.stack([step.lengths[i] for i in mod]) - start
    assert (added.max(1).values != added.min(1).values).any()


@pytest.mark.parametrize("graphed_family, window", FAMILY_CASES)
def test_graphed_decoder_matches_generate_dense_and_batch_one(graphed_family, window, ids, left_pad):
    """Every family, the unconverted model and a converted one, batch 1 and a left-padded batch.
    With a sliding window of 8, prompt and new tokens pass it (33 to 36 tokens a row) and a
    converted model is tried with each router kind (threshold-p's thresholds, topk's causal
    predictor), also on gathered rows; the window changes the tokens (a model whose window is out
    of reach differs)."""
    dense = build_windowed(graphed_family, window)
    dense.config.output_router_logits = False  # see test_speculative_decode._pair: transformers' own MoE loss
    x1 = ids(1, 9, seed=3)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    new = 10 if window is None else 24
    routers = ("threshold-p",) if window is None else ("threshold-p", "topk")
    converted = [routed(build_windowed(graphed_family, window), router=r) for r in routers]
    for model in (dense, *converted):
        decoder = GraphedDecoder(model, cuda_graphs=False)
        expected = greedy(model, x, mask, new)
        assert torch.equal(decoder.generate(x1, max_new_tokens=new), greedy(model, x1, None, new))
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=new), expected)
        if window is not None and model is dense:
            assert not torch.equal(greedy(widened(copy.deepcopy(dense)), x, mask, new), expected)
        elif window is not None:  # gathered rows: a windowed MoD layer's slot positions in the whole cache
            gathered = GraphedDecoder(model, cuda_graphs=False, branches="gather")
            assert torch.equal(gathered.generate(x, attention_mask=mask, max_new_tokens=new), expected)


@pytest.mark.parametrize("moe_family", [f for f in GRAPHED_FAMILIES if "moe" in f or f == "mixtral"])
def test_graphed_decoder_mixture_of_experts(moe_family, ids, left_pad):
    """Staged MoDE: the expert statistics after graphed decoding are the prompt's (the decode steps
    run the layers outside the model's forward, so the experts' recorder counts nothing there);
    transformers' eager expert loop (nonzero/where: host syncs) is refused for CUDA graphs."""
    model = routed(build_windowed(moe_family, None))
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    with torch.no_grad():
        model(x, attention_mask=mask)
    prompt_stats = modadapt.expert_stats(model)
    assert prompt_stats and sum(row["tokens"] for row in prompt_stats) > 0
    assert torch.equal(
        GraphedDecoder(model).generate(x, attention_mask=mask, max_new_tokens=8), greedy(model, x, mask, 8)
    )
    GraphedDecoder(model).generate(x, attention_mask=mask, max_new_tokens=8)
    assert modadapt.expert_stats(model) == prompt_stats
    model.config._experts_implementation = "eager"
    with pytest.raises(ModAdaptError, match="eager expert loop.*cuda_graphs=False.*model.generate"):
        GraphedDecoder(model, cuda_graphs=True)
    assert GraphedDecoder(model).cuda_graphs is False  # the default: the pieces run eagerly


@pytest.mark.parametrize("branches", ["host", "select", "gather", "auto"])
@pytest.mark.parametrize("router", ["threshold-p", "topk", "random"])
def test_graphed_decoder_batch_one_and_routers(router, branches, tiny, ids):
    model = routed(tiny("llama"), router=router)
    x = ids(1, 9, seed=3)
    torch.manual_seed(0)
    expected = greedy(model, x, None, 12)
    decoder = GraphedDecoder(model, branches=branches)
    torch.manual_seed(0)
    assert torch.equal(decoder.generate(x, max_new_tokens=12), expected)


def test_graphed_decoder_dense_model_and_reuse(tiny, ids, left_pad):
    model = tiny("llama")
    decoder = GraphedDecoder(model)
    for seed in (1, 2):  # a second prompt reuses the step of the first (same bucketed capacities)
        x, mask, _ = left_pad([ids(1, n, seed=seed + n)[0] for n in (5, 9)])
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=6), greedy(model, x, mask, 6))
    assert len(decoder._steps) == 1


def test_graphed_decoder_mod_cache_holds_only_kept_pairs(tiny, ids):
    model = routed(tiny("llama"))
    decoder = GraphedDecoder(model)
    decoder.generate(ids(2, 20, seed=4), max_new_tokens=8)
    state = state_of(model)
    step = decoder.last_step
    dense = next(i for i in range(len(step.lengths)) if i not in state.layer_indices)
    assert step.lengths[dense].tolist() == [20 + 7, 20 + 7]  # prompt + 7 decode steps (the 8th token is not fed)
    for i in state.layer_indices:
        assert (step.lengths[i] < 27).any()  # skipped pairs are not stored
        assert step.keys[i].shape[1] % BUCKET == 0  # [B, capacity, Hk, d]
    allocated, used = decoder.kv_bytes()
    assert 0 < used < allocated


def test_graphed_decoder_refuses_other_families(tiny, monkeypatch):
    """Every decoder preset is graphed; a family outside `GRAPHED_FAMILIES` (GPT-2 taken out of it
    here) is refused, naming the ones it can and what to use instead, and so is a decoder with no
    position encoding it knows (neither a rotary embedding nor position embeddings)."""
    from modadapt.adapters.hf import decoder as hf

    assert not set(DECODER_FAMILIES) - set(GRAPHED_FAMILIES)
    with monkeypatch.context() as patch:
        patch.setattr(hf, "GRAPHED_FAMILIES", tuple(f for f in hf.GRAPHED_FAMILIES if f != "gpt2"))
        with pytest.raises(ModAdaptError, match="supports llama.*not 'gpt2'.*; decode it with model.generate"):
            GraphedDecoder(modadapt.convert(tiny("gpt2"), router="threshold-p"))
    model = tiny("gpt2")
    del model.transformer.wpe
    with pytest.raises(ModAdaptError, match="GPT2Model has neither a rotary embedding nor position embeddings"):
        GraphedDecoder(model)


def test_graphed_decoder_bad_input(tiny, ids):
    attention_routed = modadapt.convert(tiny("llama"), router="attention", layers="every-other")
    with pytest.raises(ModAdaptError, match="'attention'.*captured"):
        GraphedDecoder(attention_routed)
    model = tiny("llama")
    decoder = GraphedDecoder(model)
    with pytest.raises(ModAdaptError, match="max_new_tokens"):
        decoder.generate(ids(1, 4), max_new_tokens=0)
    with pytest.raises(ModAdaptError, match="input_ids"):
        decoder.generate(ids(1, 4)[0])
    with pytest.raises(ModAdaptError, match="prefill"):
        GraphedDecoder(model).decode(1)
    decoder.prefill(ids(1, 4), None, 3)
    for steps in (-1, 1.0, True):
        with pytest.raises(ModAdaptError, match="steps must be"):
            decoder.decode(steps)
    decoder.decode(0)
    decoder.decode(2)
    with pytest.raises(ModAdaptError, match="2 are done"):  # the static cache has no room for more
        decoder.decode(2)
    with pytest.raises(ModAdaptError, match=r"no beam search \(num_beams=4\).*model.generate\(input_ids, num_beams=4"):
        decoder.generate(ids(1, 4), max_new_tokens=3, num_beams=4)
    with pytest.raises(ModAdaptError, match="does not take num_return_sequences; use model.generate"):
        decoder.generate(ids(1, 4), max_new_tokens=3, num_return_sequences=2)
    with pytest.raises(ModAdaptError, match="CUDA"):
        GraphedDecoder(model, cuda_graphs=True)
    model.train()
    with pytest.raises(ModAdaptError, match="eval"):
        decoder.generate(ids(1, 4), max_new_tokens=2)


def test_mod_attention_at_batch_splits_for_the_rows_its_router_keeps():
    """`expected_readers`: the router's target share of the batch, rounded up, at least one row;
    a router that names no share (threshold-p with target none) is taken to keep half."""
    from types import SimpleNamespace

    from modadapt.decoding.step import READ_SHARE, expected_readers

    assert expected_readers(SimpleNamespace(target_share=0.125), 32) == 4
    assert expected_readers(SimpleNamespace(target_share=0.1), 30) == 3  # not 4 from float noise
    assert expected_readers(SimpleNamespace(target_share=0.01), 8) == 1
    assert expected_readers(SimpleNamespace(target_share=1.0), 8) == 8
    assert expected_readers(SimpleNamespace(target_share=None), 32) == round(32 * READ_SHARE)
    model = modadapt.convert(build_tiny("llama"), router="threshold-p", router_kwargs={"target": None})
    assert expected_readers(modadapt.mod_layers(model)[0].router, 8) == 4


def test_graphed_decoder_branch_modes(tiny, monkeypatch):
    import modadapt.decoding.decoder as gd
    from modadapt.decoding.step import BRANCHES, gather_buckets

    model = tiny("llama")
    assert GraphedDecoder(model, branches="select").branches_for(1) == "select"
    assert GraphedDecoder(model, branches="gather").branches_for(32) == "gather"
    monkeypatch.setattr(gd, "conditional_nodes_available", lambda: True)
    auto = GraphedDecoder(model)
    assert (auto.branches_for(1), auto.branches_for(8)) == ("conditional", "select")
    assert auto.branches_for(8, none_kept_chance=0.5) == "conditional"
    assert auto.branches_for(8, none_kept_chance=0.005) == "select"
    monkeypatch.setattr(gd, "conditional_nodes_available", lambda: False)  # no conditional nodes at all
    assert (auto.branches_for(1), auto.branches_for(8)) == ("host", "select")
    # at batch: host where no row keeps a MoD layer's token often enough to pay the round trips
    assert (auto.branches_for(8, none_kept_chance=0.26), auto.branches_for(8, none_kept_chance=0.005)) == (
        "host",
        "select",
    )
    assert auto.branches_for(1, none_kept_chance=0.0) == "host"
    assert GraphedDecoder(model, branches="select").branches_for(8, none_kept_chance=0.9) == "select"
    for mode, other in (("conditional", "host"), ("gather-conditional", "gather")):
        with pytest.raises(ModAdaptError, match=f"{mode}.*conditional nodes.*branches='{other}'"):
            GraphedDecoder(model, branches=mode)
    assert available_branches(conditional=False) == ("auto", "gather", "host", "select")
    assert available_branches(conditional=True) == BRANCHES
    with pytest.raises(ModAdaptError, match="branches must be one of auto, conditional, gather, gather-conditional"):
        GraphedDecoder(model, branches="sometimes")
    assert [gather_buckets(b) for b in (1, 3, 32)] == [(1,), (1, 2, 3), (1, 2, 4, 8, 16, 32)]


@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_decoder_sigmoid_gate(batch, tiny, ids):
    """A gate that scales the kept tokens' update is applied the same way in both body forms
    (batch 1: only run when kept; batches: every row, then `where`)."""
    model = routed(tiny("llama"), router_kwargs={"gate": "sigmoid"})
    x = ids(batch, 8, seed=5)
    assert torch.equal(GraphedDecoder(model).generate(x, max_new_tokens=8), greedy(model, x, None, 8))


def test_static_attention_reads_only_used_slots():
    from modadapt.adapters.hf.attention import static_decode_attention
    from modadapt.decoding.static_cache import KeyLengths

    gen = torch.Generator().manual_seed(0)
    B, H, Hk, d, cap = 3, 4, 2, 8, 16
    q = torch.randn(B, H, 1, d, generator=gen)
    k, v = torch.randn(B, cap, Hk, d, generator=gen), torch.randn(B, cap, Hk, d, generator=gen)
    used = torch.tensor([5, 16, 1], dtype=torch.int32)
    cu = torch.arange(B + 1, dtype=torch.int32)
    out, _ = static_decode_attention(None, q, k, v, KeyLengths(used, cu, cu * cap), scaling=0.3)
    assert out.shape == (B, 1, H, d)
    for b in range(B):
        n = int(used[b])
        keys = k[b, :n].transpose(0, 1).repeat_interleave(H // Hk, 0)  # [H, n, d]
        values = v[b, :n].transpose(0, 1).repeat_interleave(H // Hk, 0)
        weights = torch.softmax(q[b] @ keys.transpose(1, 2) * 0.3, -1)  # [H, 1, n]
        torch.testing.assert_close(out[b, 0], (weights @ values)[:, 0])
    k[0, 5:], v[0, 5:] = 1e4, -1e4  # slots past a row's length do not count
    out2, _ = static_decode_attention(None, q, k, v, KeyLengths(used, cu, cu * cap), scaling=0.3)
    torch.testing.assert_close(out2, out)


def test_static_attention_several_queries_per_row():
    """A speculative verification feeds T tokens per row: written at consecutive slots ending at
    the row's used length, each attends causally (the slots before its own, and itself)."""
    from modadapt.adapters.hf.attention import static_decode_attention
    from modadapt.decoding.static_cache import KeyLengths, StaticCache

    gen = torch.Generator().manual_seed(1)
    B, H, Hk, d, cap, T = 3, 4, 2, 8, 16, 3
    q = torch.randn(B, H, T, d, generator=gen)
    k, v = torch.randn(B, cap, Hk, d, generator=gen), torch.randn(B, cap, Hk, d, generator=gen)
    base = torch.tensor([2, 13, 0])
    new_k, new_v = torch.randn(B, Hk, T, d, generator=gen), torch.randn(B, Hk, T, d, generator=gen)
    StaticCache([k], [v], [base]).update(new_k, new_v, 0)
    for b in range(B):
        n = int(base[b])
        assert torch.equal(k[b, n : n + T], new_k[b].transpose(0, 1)) and torch.equal(
            v[b, n : n + T], new_v[b].transpose(0, 1)
        )
    used = (base + T).to(torch.int32)
    cu = torch.arange(B + 1, dtype=torch.int32)
    out, _ = static_decode_attention(None, q, k, v, KeyLengths(used, cu * T, cu * cap, queries=T), scaling=0.3)
    assert out.shape == (B, T, H, d)
    for b in range(B):
        for t in range(T):
            n = int(base[b]) + t + 1  # its own slot and the ones before
            keys = k[b, :n].transpose(0, 1).repeat_interleave(H // Hk, 0)
            values = v[b, :n].transpose(0, 1).repeat_interleave(H // Hk, 0)
            weights = torch.softmax(q[b, :, t : t + 1] @ keys.transpose(1, 2) * 0.3, -1)
            torch.testing.assert_close(out[b, t], (weights @ values)[:, 0])
    with pytest.raises(ModAdaptError, match="only runs"):  # queries must match what the lengths say
        static_decode_attention(None, q, k, v, KeyLengths(used, cu, cu * cap), scaling=0.3)


def _reference_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, used):
    """flash's varlen contract, written out: row b's queries `q[cu_q[b]:cu_q[b+1]]` read its first
    `used[b]` keys from `cu_k[b]`; query head h reads K/V head h // (Hq / Hk); causal is aligned
    to the row's end."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(len(used)):
        rows, n = slice(int(cu_q[b]), int(cu_q[b + 1])), int(used[b])
        keys = k[int(cu_k[b]) : int(cu_k[b]) + n].repeat_interleave(group, 1).transpose(0, 1)  # [Hq, n, d]
        values = v[int(cu_k[b]) : int(cu_k[b]) + n].repeat_interleave(group, 1).transpose(0, 1)
        scores = q[rows].transpose(0, 1) @ keys.transpose(1, 2) * scale  # [Hq, Tq, n]
        if causal:
            Tq = scores.shape[1]
            sees = torch.arange(n)[None, :] <= (n - Tq + torch.arange(Tq))[:, None]
            scores = scores.masked_fill(~sees, float("-inf"))
        out[rows] = (scores.softmax(-1) @ values).transpose(0, 1)
    return out


def _windowed_lengths(held, used, T, cap, window, gen):
    """`KeyLengths` of `T` queries per row ending at `used`, with `window`: "dense" slots (slot s
    at position s) or "mod" ones (positions with gaps: the tokens a MoD layer skipped)."""
    from modadapt.decoding.static_cache import KeyLengths

    B = len(used)
    cu = torch.arange(B + 1, dtype=torch.int32)
    if held is None:
        return KeyLengths(used, cu * T, cu * cap, queries=T)
    own = used.long()[:, None] - T + torch.arange(T)  # [B, T]: each query's slot
    slots = None
    if held == "mod":
        slots = torch.randint(1, 4, (B, cap), generator=gen).cumsum(1) - 1  # increasing, with gaps
        positions = slots.gather(1, own)
    else:
        positions = own
    return KeyLengths(used, cu * T, cu * cap, queries=T, window=window, positions=positions, slot_positions=slots)


@pytest.mark.parametrize("held", [None, "dense", "mod"])
@pytest.mark.parametrize(
    "heads,kv_heads,queries,multiprocessors,gathered",
    [
        (8, 2, 1, 6, False),
        (8, 2, 1, 7, False),
        (4, 4, 1, 1, False),
        (8, 2, 3, 1, False),
        (8, 2, 1, 6, True),
        (8, 2, 1, 7, True),
        (4, 4, 1, 1, True),
    ],
)
def test_static_attention_flash_layouts_match_the_fallback(
    heads, kv_heads, queries, multiprocessors, gathered, held, monkeypatch
):
    """The flash path's layouts, checked on CPU against flash's contract: a decode token's grouped
    query heads go packed as G queries per K/V head (each K/V head read once for its group) when
    the packed blocks (rows x K/V heads: 3 x 2 here) fill the device's multiprocessors, else one
    query per head; the T queries of a verification go as they are; all equal the masked
    fallback, `grouped_cu_q` is filled once and reused (captured graphs read that tensor).
    `gathered`: the 3 query rows read cache rows 4, 0, 2 of 5 (`KeyLengths.rows`; flash through
    `cu_k`, out of order), as the rows alone would. With a sliding window (`held`: dense or MoD
    slots) a decode token reads its row from the window's first slot (offset row starts, shorter
    used lengths: flash's contract does the rest); several queries per row, each with its own
    window start, take the masked path."""
    from modadapt.decoding import static_cache
    from modadapt.decoding.static_cache import KeyLengths

    gen = torch.Generator().manual_seed(2)
    B, d, cap, T = 3, 8, 16, queries
    q = torch.randn(B, heads, T, d, generator=gen)
    k, v = torch.randn(B, cap, kv_heads, d, generator=gen), torch.randn(B, cap, kv_heads, d, generator=gen)
    used = torch.tensor([5, 16, 3], dtype=torch.int32)
    cu = torch.arange(B + 1, dtype=torch.int32)
    lengths = _windowed_lengths(held, used, T, cap, 4, gen)
    reference = static_cache.static_cache_attention(q, k, v, lengths, 0.3)  # masked SDPA on CPU
    if gathered:  # the same rows at 4, 0, 2 of a larger cache
        rows = torch.tensor([4, 0, 2])
        k_all, v_all = torch.randn(5, cap, kv_heads, d, generator=gen), torch.randn(5, cap, kv_heads, d, generator=gen)
        k_all[rows], v_all[rows] = k, v
        k, v = k_all, v_all
        held_all = None
        if lengths.slot_positions is not None:  # the whole cache's slot positions, the rows' at theirs
            held_all = torch.randint(0, 99, (5, cap), generator=gen)
            held_all[rows] = lengths.slot_positions
        starts = torch.cat([rows * cap, torch.tensor([5 * cap])]).to(torch.int32)
        window = dict(window=4, positions=lengths.positions, slot_positions=held_all) if held else {}
        lengths = KeyLengths(used, cu, starts, rows=rows, **window)
        torch.testing.assert_close(static_cache.static_cache_attention(q, k, v, lengths, 0.3), reference)
        lengths.windowed = None  # (the fallback made none; as a fresh call)
    calls = []

    def flash(*args):
        calls.append(args[5])  # max_q: G packed queries, or T
        return _reference_flash_varlen(*args)

    monkeypatch.setattr(static_cache, "_FLASH", {})  # what this test's calls record is dropped after
    monkeypatch.setattr(static_cache, "flash_available", lambda query: True)
    monkeypatch.setattr(static_cache, "flash_varlen", flash)
    monkeypatch.setattr(static_cache, "multiprocessors", lambda device: multiprocessors)
    out = static_cache.static_cache_attention(q, k, v, lengths, 0.3)
    torch.testing.assert_close(out, reference)
    packed = T == 1 and heads > kv_heads and B * kv_heads >= multiprocessors
    assert calls == ([] if held and T > 1 else [heads // kv_heads if packed else T])
    assert list(lengths.grouped_cu_q) == ([heads // kv_heads] if packed else [])
    if packed:
        cu_grouped = lengths.grouped_cu_q[heads // kv_heads]
        torch.testing.assert_close(static_cache.static_cache_attention(q, k, v, lengths, 0.3), reference)
        assert lengths.grouped_cu_q[heads // kv_heads] is cu_grouped
    if held and T == 1:  # the window's keys: a suffix of each row's used slots, made once
        cu_k, seen = lengths.window_keys()
        assert lengths.window_keys()[0] is cu_k
        assert (seen <= 4).all() and (seen >= 1).all() and (cu_k[:-1] % cap + seen == used).all()


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("held", ["dense", "mod"])
def test_static_attention_sliding_window(held, queries, softcap):
    """A sliding window over the static cache, against attention written out: a query at position
    `p` reads exactly the used slots (the slots before it and itself, with several queries)
    holding positions `> p - window`. A MoD layer's slots hold positions with gaps (its skipped
    tokens), kept beside the K/V: `StaticCache.update` writes the new tokens' positions there."""
    from modadapt.adapters.hf.attention import static_decode_attention
    from modadapt.decoding.static_cache import StaticCache

    gen = torch.Generator().manual_seed(3)
    B, H, Hk, d, cap, T, window = 3, 4, 2, 8, 24, queries, 5
    q = torch.randn(B, H, T, d, generator=gen)
    k, v = torch.randn(B, cap, Hk, d, generator=gen), torch.randn(B, cap, Hk, d, generator=gen)
    base = torch.tensor([3, 17, 0])  # slots each row holds before the new tokens
    used = (base + T).to(torch.int32)
    lengths = _windowed_lengths(held, used, T, cap, window, gen)
    if held == "mod":  # the new tokens' positions reach the slots through the cache's update
        slots = lengths.slot_positions
        written = slots.clone()
        slots[torch.arange(B)[:, None], base[:, None] + torch.arange(T)] = -100
        new_k, new_v = torch.randn(B, Hk, T, d, generator=gen), torch.randn(B, Hk, T, d, generator=gen)
        StaticCache([k], [v], [base], [slots], lengths.positions).update(new_k, new_v, 0)
        assert torch.equal(slots, written)
        for b in range(B):
            assert torch.equal(k[b, base[b] : base[b] + T], new_k[b].transpose(0, 1))
    kwargs = {} if softcap is None else {"softcap": softcap}
    out, _ = static_decode_attention(None, q, k, v, lengths, scaling=0.3, sliding_window=window, **kwargs)
    assert out.shape == (B, T, H, d)
    positions = lengths.slot_positions if held == "mod" else torch.arange(cap).expand(B, cap)
    for b in range(B):
        for t in range(T):
            own = int(base[b]) + t
            seen = torch.arange(cap) <= own
            seen &= positions[b] > lengths.positions[b, t] - window
            keys = k[b, seen].transpose(0, 1).repeat_interleave(H // Hk, 0)  # [H, n, d]
            values = v[b, seen].transpose(0, 1).repeat_interleave(H // Hk, 0)
            scores = q[b, :, t : t + 1] @ keys.transpose(1, 2) * 0.3
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            torch.testing.assert_close(out[b, t], (scores.softmax(-1) @ values)[:, 0])
            if own >= window:  # the window cuts this row: fewer keys than the causal ones
                assert int(seen.sum()) < own + 1
    with pytest.raises(ModAdaptError, match="sliding_window=6, but its config gives it 5"):
        static_decode_attention(None, q, k, v, lengths, scaling=0.3, sliding_window=6)


def test_graphed_decoder_window_comes_from_the_config(ids):
    """The static attention takes each layer's window from the config (`DecodeParts.windows`)
    and checks it against the `sliding_window` the layer passes: a layer changed behind the
    config's back is an error, not a silently different window."""
    model = build_windowed("gemma3", 8)
    model.model.layers[0].self_attn.sliding_window = 6
    with pytest.raises(ModAdaptError, match="layer 0 attends with sliding_window=6, but its config gives it 8"):
        GraphedDecoder(model).generate(ids(1, 12), max_new_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention on CUDA")
def test_flash_gathered_rows_match_the_masked_fallback_on_cuda():
    """torch's flash kernel with used lengths reads each query row's K/V from the cache row
    `cu_k` names, out of order and skipping rows (a gathered call: rows 6, 1, 3, 0 of 8, GQA
    packed, the last a filler row of used length 0), as the masked fallback does on the other
    rows. Run on the GPU machine: `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    from modadapt.decoding.static_cache import KeyLengths

    gen = torch.Generator().manual_seed(0)
    n, B, H, Hk, d, cap = 4, 8, 8, 2, 64, 256
    q = torch.randn(n, H, 1, d, generator=gen).cuda().bfloat16()
    k, v = (torch.randn(B, cap, Hk, d, generator=gen).cuda().bfloat16() for _ in range(2))
    rows = torch.tensor([6, 1, 3, 0], device="cuda")
    used = torch.tensor([200, 17, 256, 0], dtype=torch.int32, device="cuda")
    starts = torch.cat([rows * cap, torch.tensor([B * cap], device="cuda")]).int()
    lengths = KeyLengths(used, torch.arange(n + 1, dtype=torch.int32, device="cuda"), starts, rows=rows)
    flash, reference = flash_and_fallback(q, k, v, lengths, d**-0.5)
    assert (flash[:3] - reference[:3]).norm() / reference[:3].norm() < 1e-2


@pytest.mark.parametrize("branches", ["select", "gather", "gather-conditional"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_decoder_batch_branches(batch, branches, tiny, ids):
    """`branches="select"`: every row runs the MoD layer, `where` keeps the skipping rows' input;
    `"gather"` (and `"gather-conditional"`, eagerly the same pieces): only the kept rows run."""
    model = routed(tiny("llama"))
    x = ids(batch, 9, seed=6)
    decoder = GraphedDecoder(model, branches=branches)
    assert torch.equal(decoder.generate(x, max_new_tokens=10), greedy(model, x, None, 10))
    assert decoder.last_step.mode == branches and not decoder.last_step.runs_only_when_kept


@pytest.mark.parametrize("branches", ["gather", "gather-conditional"])
@pytest.mark.parametrize("router", ["threshold-p", "topk"])
def test_gathered_rows_match_select_and_generate(router, branches, tiny, ids, left_pad, monkeypatch):
    """Gathered rows, a left-padded batch of 6 whose rows keep different counts: one MoD layer
    keeps every row (the full bucket), one none (no bucket runs), one some (smaller buckets).
    The tokens are `model.generate`'s and select mode's, every layer's per-row lengths and used
    K/V are select mode's, and the filler rows of a bucket change nothing."""
    from modadapt.decoding.step import DecodeStep

    model = routed(tiny("llama"), router=router)
    everyone, nobody, _ = modadapt.mod_layers(model)
    with torch.no_grad():
        everyone.router.scorer.bias.fill_(1e4)
        nobody.router.scorer.bias.fill_(-1e4)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4, 9, 3, 10)])
    expected = greedy(model, x, mask, 12)
    select = GraphedDecoder(model, branches="select")
    assert torch.equal(select.generate(x, attention_mask=mask, max_new_tokens=12), expected)
    ran, gathered = [], DecodeStep._gathered
    monkeypatch.setattr(DecodeStep, "_gathered", lambda self, i, n: ran.append((i, n)) or gathered(self, i, n))
    decoder = GraphedDecoder(model, branches=branches)
    assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=12), expected)
    mod = state_of(model).layer_indices
    sizes = {i: {n for j, n in ran if j == i} for i in mod}
    assert sizes[mod[0]] == {6} and sizes[mod[1]] == set()  # keeps all (one bucket: the batch), keeps none
    assert len(sizes[mod[2]]) > 1 and max(sizes[mod[2]]) < 6  # rows keep different counts per step
    step, other = decoder.last_step, select.last_step
    for i, (n, m) in enumerate(zip(step.lengths, other.lengths)):
        assert torch.equal(n, m), i
        for row, used in enumerate(n.tolist()):
            torch.testing.assert_close(step.keys[i][row, :used], other.keys[i][row, :used])
            torch.testing.assert_close(step.values[i][row, :used], other.values[i][row, :used])
    final = step.lengths[mod[2]].clone()
    added = final - decoder.prefill(x, mask, 12).lengths[mod[2]]
    assert added.min() < added.max()


@pytest.mark.parametrize("both_rows_end", [False, True])
def test_graphed_decoder_stops_at_end_of_sequence(both_rows_end, tiny, monkeypatch):
    import modadapt.decoding.decoder as gd

    monkeypatch.setattr(gd, "CHECK_EVERY", 4)
    model = routed(tiny("llama"))
    decoder = GraphedDecoder(model)
    stops_at_end_of_sequence(model, decoder, both_rows_end)
    assert (int(decoder.last_step.count) < 23) == both_rows_end  # stopped decoding once every row had ended


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_captured_graphs_match_generate_on_cuda():
    """The captured step (every branch mode this torch captures: host, select, gathered rows,
    conditional nodes where torch has them) in float32 on CUDA gives `model.generate`'s tokens,
    at batch 1 and in a left-padded batch, and captured sampling is
    seeded by `torch.manual_seed`. Run on the GPU machine:
    `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    modes = available_branches()
    for router, branches in [(r, b) for r in ("threshold-p", "topk") for b in modes]:
        model = routed(build_tiny("llama"), router).cuda()
        decoder = GraphedDecoder(model, branches=branches)
        for x, mask in cuda_prompts():
            expected = greedy(model, x, mask, 40)
            got = decoder.generate(x, attention_mask=mask, max_new_tokens=40)
            assert decoder.last_step.graphs is not None
            assert torch.equal(got, expected), (router, branches, x.shape[0], decoder.last_step.mode)
            assert torch.equal(
                decoder.generate(x, attention_mask=mask, max_new_tokens=40, do_sample=True, top_k=1), expected
            )  # a captured draw of the argmax
            # replays draw from the default generator's current state
            sampling_is_seeded(
                decoder.generate, x, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=2.0
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("graphed_family, window", FAMILY_CASES)
def test_every_family_captured_matches_generate_on_cuda(graphed_family, window):
    """Every graphed family's captured step in float32 on CUDA (threshold-p on all but the first
    layer, random routers; the mixtures of experts through transformers' `grouped_mm` experts, the
    tiny presets' default) gives `model.generate`'s tokens, at batch 1 and in a left-padded batch,
    with the default branches and with gathered rows (each family's layer on a gathered batch:
    its rotary embeddings, experts, learned positions); and so does every family with a sliding
    window, with one of 8 that the tokens pass.
    Run on the GPU machine: `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    model = routed(build_windowed(graphed_family, window)).cuda()
    for branches in ("auto", "gather"):
        decoder = GraphedDecoder(model, cuda_graphs=True, branches=branches)
        for x, mask in cuda_prompts():
            expected = greedy(model, x, mask, 24)
            got = decoder.generate(x, attention_mask=mask, max_new_tokens=24)
            assert decoder.last_step.graphs is not None
            assert torch.equal(got, expected), (graphed_family, x.shape[0], decoder.last_step.mode)


def test_graphed_decoder_sampling(tiny, ids):
    model = routed(tiny("llama"))
    x = ids(2, 7, seed=8)
    decoder = GraphedDecoder(model)
    # top-k 1 draws the argmax: the greedy tokens
    assert torch.equal(decoder.generate(x, max_new_tokens=12, do_sample=True, top_k=1), greedy(model, x, None, 12))
    drawn = sampling_is_seeded(decoder.generate, x, max_new_tokens=12, do_sample=True, temperature=2.0, top_p=0.9)
    assert not torch.equal(drawn, greedy(model, x, None, 12))
    with pytest.raises(ModAdaptError, match="temperature"):
        decoder.generate(x, max_new_tokens=2, do_sample=True, temperature=0)
    with pytest.raises(ModAdaptError, match="top_p"):
        decoder.generate(x, max_new_tokens=2, do_sample=True, top_p=1.5)


@pytest.mark.parametrize("sampled_family", ["llama", "gpt2"])
def test_graphed_decoder_sampling_matches_generate(sampled_family, tiny, ids, left_pad):
    """Seeded draws are `model.generate(do_sample=True)`'s, for the dense model and a converted
    one, batch 1 and a left-padded batch (GPT-2: learned positions from the attention mask)."""
    x1 = ids(1, 9, seed=3)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    for model in (tiny(sampled_family), routed(build_windowed(sampled_family, None))):
        decoder = GraphedDecoder(model, cuda_graphs=False)
        for prompt, prompt_mask in ((x1, None), (x, mask)):
            options = dict(max_new_tokens=10, do_sample=True, temperature=2.0, top_k=0)
            torch.manual_seed(5)
            got = decoder.generate(prompt, attention_mask=prompt_mask, **options)
            torch.manual_seed(5)
            with torch.no_grad():
                expected = model.generate(prompt, attention_mask=prompt_mask, min_new_tokens=10, **options)
            assert torch.equal(got, expected)
            assert not torch.equal(got, greedy(model, prompt, prompt_mask, 10))


@pytest.mark.parametrize("top_k, top_p", [(50, None), (5, None), (None, 0.3), (10, 0.9), (0, 0.5)])
def test_sampling_filters_match_transformers(top_k, top_p):
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from modadapt.decoding.sampling import Sampling, sampling_logits

    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(2)) * 3
    ours = sampling_logits(logits, Sampling(0.7, top_k, top_p))
    theirs = logits / 0.7
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_graphed_decoder_sampling_defaults_follow_the_generation_config(tiny, ids):
    model = tiny("llama")
    model.generation_config.top_k = 1  # as model.generate would: the argmax
    x = ids(1, 5, seed=3)
    assert torch.equal(GraphedDecoder(model).generate(x, max_new_tokens=6, do_sample=True), greedy(model, x, None, 6))


def test_captured_step_follows_router_changes(tiny, ids):
    """Changing a router in place (training, load_state_dict) makes the next prefill capture afresh."""
    model = routed(tiny("llama"))
    decoder = GraphedDecoder(model)
    x = ids(1, 6, seed=4)
    decoder.generate(x, max_new_tokens=4)
    first = decoder.last_step
    decoder.generate(x, max_new_tokens=4)
    assert decoder.last_step is first
    with torch.no_grad():
        modadapt.mod_layers(model)[0].router.scorer.bias.add_(1.0)
    assert torch.equal(decoder.generate(x, max_new_tokens=4), greedy(model, x, None, 4))
    assert decoder.last_step is not first


def test_next_token_filters():
    from modadapt.decoding.sampling import Sampling, next_token

    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert next_token(logits, None).tolist() == [[1]]
    torch.manual_seed(0)
    picks = {int(next_token(logits, Sampling(top_k=2))) for _ in range(200)}
    assert picks == {1, 2}  # only the two largest
    picks = {int(next_token(logits, Sampling(top_p=0.4))) for _ in range(200)}
    assert picks == {1}  # the first token already holds more than 0.4 of the mass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_captured_graphs_equal_their_eager_pieces_in_bf16(monkeypatch):
    """In bf16 the decode attention runs the split-KV kernel (or flash with used lengths); the
    captured graphs replay the very kernels the eager pieces run, so the tokens are equal (greedy,
    every branch mode, the conditional ones stitched through the driver where torch has none)."""
    from modadapt.decoding import static_cache

    model = routed(build_tiny("llama")).cuda().to(torch.bfloat16)
    x, mask = cuda_prompts()[1]
    for kernel in static_cache.DECODE_KERNELS:  # the split-KV kernel and flash, each eager vs graphed
        monkeypatch.setattr(static_cache, "DECODE_KERNEL", kernel)
        for batch in (1, 3):
            eager = GraphedDecoder(model, cuda_graphs=False).generate(
                x[:batch], attention_mask=mask[:batch], max_new_tokens=40
            )
            for branches in available_branches():
                graphed = GraphedDecoder(model, branches=branches)
                assert torch.equal(graphed.generate(x[:batch], attention_mask=mask[:batch], max_new_tokens=40), eager)
                assert graphed.last_step.graphs is not None
    assert any(static_cache._FLASH.values()), "the flash decode attention did not run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_captured_windowed_graphs_match_generate_on_cuda():
    """Sliding windows in the captured step (float32: the masked attention; every branch mode):
    Gemma 3 (sliding and global layers) and Mistral (a window in every layer) with a window of 8,
    prompts and 40 new tokens past it, give `model.generate`'s tokens; in bf16 the flash decode
    attention reads each row from its window's first slot, and the captured graphs give what
    their eager pieces give. Run on the GPU machine: `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    from modadapt.decoding import static_cache

    modes = available_branches()  # the gathered modes included
    prompts = cuda_prompts()
    for family in ("gemma3", "mistral"):
        for router in ("threshold-p", "topk"):
            model = routed(build_windowed(family, 8), router).cuda()
            for branches in modes:
                decoder = GraphedDecoder(model, branches=branches)
                for x, mask in prompts:
                    got = decoder.generate(x, attention_mask=mask, max_new_tokens=40)
                    assert decoder.last_step.graphs is not None
                    assert torch.equal(got, greedy(model, x, mask, 40)), (family, router, branches, x.shape[0])
            model = model.to(torch.bfloat16)
            x, mask = prompts[1]
            eager = GraphedDecoder(model, cuda_graphs=False).generate(x, attention_mask=mask, max_new_tokens=40)
            for branches in modes:
                graphed = GraphedDecoder(model, branches=branches)
                assert torch.equal(graphed.generate(x, attention_mask=mask, max_new_tokens=40), eager), branches
    assert any(static_cache._FLASH.values()), "the flash decode attention did not run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs flash attention")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("held", ["dense", "mod"])
def test_windowed_flash_attention_matches_the_mask_on_cuda(held, packed, monkeypatch):
    """On CUDA in bf16 a decode token's windowed attention runs flash from the window's first
    slot (row offsets and used lengths: `KeyLengths.window_keys`); it equals the masked SDPA
    path, grouped heads packed (`pack_groups`, forced here) or not. Run on the GPU machine:
    `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    from modadapt.decoding import static_cache

    if packed:
        monkeypatch.setattr(static_cache, "multiprocessors", lambda device: 1)
    gen = torch.Generator().manual_seed(4)
    for heads, kv_heads in ((8, 2), (4, 4)):
        B, d, cap = 3, 64, 256
        q = torch.randn(B, heads, 1, d, generator=gen)
        k, v = torch.randn(B, cap, kv_heads, d, generator=gen), torch.randn(B, cap, kv_heads, d, generator=gen)
        used = torch.tensor([5, 256, 130], dtype=torch.int32)
        lengths = _windowed_lengths(held, used, 1, cap, 32, gen)
        fields = ("used", "cu_q", "cu_k", "positions", "slot_positions")
        for name in fields:
            value = getattr(lengths, name)
            if value is not None:
                setattr(lengths, name, value.cuda())
        q, k, v = (t.cuda().to(torch.bfloat16) for t in (q, k, v))
        flash = static_cache.static_cache_attention(q, k, v, lengths, 0.125)
        assert static_cache._FLASH.get(static_cache.flash_key(q)), "flash did not run"
        masked = torch.nn.functional.scaled_dot_product_attention(
            q.reshape(B, kv_heads, heads // kv_heads, d),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=lengths.mask(cap),
            scale=0.125,
        ).reshape(B, 1, heads, d)
        torch.testing.assert_close(flash.float(), masked.float(), rtol=2e-2, atol=2e-2)


def test_graphed_decoder_after_a_packed_prefill(tiny, ids, left_pad, monkeypatch):
    """A packed prompt cache (`packing="packed"`, as on CUDA) is compacted into the static cache."""
    from modadapt import varlen

    model = routed(tiny("llama"), packing="packed")
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    expected = greedy(model, x, mask, 8)
    calls, reference = [], varlen._reference
    monkeypatch.setattr(varlen, "_reference", lambda *a, **k: calls.append(1) or reference(*a, **k))
    assert torch.equal(GraphedDecoder(model).generate(x, attention_mask=mask, max_new_tokens=8), expected)
    assert calls, "the prompt did not run packed"


@pytest.mark.parametrize("router, stack", [("threshold-p", "llama"), ("topk", "llama"), ("topk", "gemma3")])
def test_graphed_decoder_prefill_in_passes(router, stack, ids, left_pad, monkeypatch):
    """`prefill(..., rows_per_pass=2)`: the prompt two rows at a time fills the step as one pass
    does (capacities, lengths, each row's used K/V slots and, in a windowed MoD layer, their
    positions) and decodes `model.generate`'s tokens (Gemma 3: a sliding window of 8)."""
    model = routed(build_windowed(stack, 8 if stack == "gemma3" else None), router=router)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (150, 131, 90, 142, 60)])  # dense capacity 256
    expected = greedy(model, x, mask, 8)
    import modadapt.decoding.decoder as gd

    estimates, rule = [], gd.auto_branches
    monkeypatch.setattr(gd, "auto_branches", lambda b, c, n=None: estimates.append(n) or rule(b, c, n))
    whole = GraphedDecoder(model).prefill(x, mask, 8)
    decoder = GraphedDecoder(model)
    step = decoder.prefill(x, mask, 8, rows_per_pass=2)
    assert len(estimates) == 2 and estimates[0] == pytest.approx(estimates[1]) and step.mode == whole.mode
    assert step.capacities == whole.capacities and BUCKET in step.capacities and 2 * BUCKET in step.capacities
    for i, (a, b) in enumerate(zip(step.lengths, whole.lengths)):
        assert torch.equal(a, b)
        for row, n in enumerate(a.tolist()):
            torch.testing.assert_close(step.keys[i][row, :n], whole.keys[i][row, :n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(step.values[i][row, :n], whole.values[i][row, :n], rtol=1e-5, atol=1e-6)
            if whole.slot_positions[i] is not None:
                assert torch.equal(step.slot_positions[i][row, :n], whole.slot_positions[i][row, :n])
    assert any(s is not None for s in step.slot_positions) == (stack == "gemma3")
    assert torch.equal(step.token, whole.token)
    first = step.token.clone()
    decoder.decode(7)
    assert torch.equal(torch.cat([first, step.out[:, :7]], 1), expected[:, -8:])
    assert decoder.kv_bytes()[0] == sum(2 * k.numel() * k.element_size() for k in whole.keys)
    with pytest.raises(ModAdaptError, match="rows_per_pass must be"):
        decoder.prefill(x, mask, 8, rows_per_pass=0)


def test_graphed_decoder_rewind_decodes_the_prompt_again(tiny, ids):
    """`rewind()` puts the step back where the prefill left it: decoding again gives the same tokens and lengths."""
    model = routed(tiny("llama"))
    decoder = GraphedDecoder(model)
    with pytest.raises(ModAdaptError, match="before rewind"):
        decoder.rewind()
    step = decoder.prefill(ids(3, 20, seed=5), None, 10)
    decoder.decode(9)
    tokens, lengths = step.out.clone(), [n.clone() for n in step.lengths]
    for _ in range(2):
        decoder.rewind()
        assert step.steps_done == 0 and not step.out.any()
        decoder.decode(9)
        assert torch.equal(step.out, tokens)
        assert all(torch.equal(a, b) for a, b in zip(step.lengths, lengths))
    with pytest.raises(ModAdaptError, match="speculative"):
        speculative = GraphedDecoder(model, speculate=2)
        speculative.prefill(ids(1, 12, seed=6), None, 4)
        speculative.rewind()
    with pytest.raises(ModAdaptError, match="rows_per_pass prefills a plain"):
        GraphedDecoder(model, speculate=2).prefill(ids(2, 12, seed=6), None, 4, rows_per_pass=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_prefill_in_passes_and_rewind_on_cuda():
    """On CUDA the step of a prefill in passes is captured after its dense layers were filled: the
    capture's warm-up writes each row's first slots and puts them back, so the captured decode
    gives `model.generate`'s tokens (float32), and again after `rewind()`. Run on the GPU machine:
    `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    from conftest import left_pad_batch, make_ids

    for router in ("threshold-p", "topk"):
        model = routed(build_tiny("llama"), router).cuda()
        x, mask, _ = (t.cuda() for t in left_pad_batch([make_ids(1, n, seed=n)[0] for n in (150, 7, 90, 12, 60)]))
        expected = greedy(model, x, mask, 40)
        decoder = GraphedDecoder(model)
        step = decoder.prefill(x, mask, 40, rows_per_pass=2)
        first = step.token.clone()
        assert step.graphs is not None
        for _ in range(2):
            decoder.decode(39)
            assert torch.equal(torch.cat([first, step.out[:, :39]], 1), expected[:, -40:]), router
            decoder.rewind()


def test_auto_branches_follow_what_the_prompt_kept(ids, left_pad, monkeypatch):
    """`branches="auto"` estimates from the prompt how often no row keeps a MoD layer's token
    (`step.none_kept`: each row keeps with its prompt's share) and picks host or select by it; the
    steps of both modes are cached apart, and both give `model.generate`'s tokens."""
    import modadapt.decoding.decoder as gd
    from modadapt.decoding.step import HOST_WHEN_NONE_KEPT, none_kept

    assert none_kept(torch.tensor([[1, 1], [0, 0]]), torch.tensor([4, 4])) == pytest.approx((0.75**2 + 1) / 2)
    assert none_kept(torch.tensor([[4, 2]]), torch.tensor([4, 4])) == 0.0  # a row that keeps everything
    monkeypatch.setattr(gd, "conditional_nodes_available", lambda: False)
    seen = []
    rule = gd.auto_branches
    monkeypatch.setattr(gd, "auto_branches", lambda b, c, n=None: seen.append(n) or rule(b, c, n))
    model = routed(build_tiny("llama"))
    decoder = GraphedDecoder(model, cuda_graphs=False)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    step = decoder.prefill(x, mask, 6)
    mod = [i for i, layer in enumerate(decoder.layers) if layer.mod]
    expected = none_kept(torch.stack([step.lengths[i] for i in mod]), mask.sum(-1))
    assert seen[-1] == pytest.approx(expected) and 0 < expected < 1
    assert step.mode == ("host" if expected >= HOST_WHEN_NONE_KEPT else "select")
    for forced, mode in ((1.0, "host"), (0.0, "select")):
        monkeypatch.setattr(gd, "none_kept", lambda kept, real, forced=forced: forced)
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=6), greedy(model, x, mask, 6))
        assert decoder.last_step.mode == mode
    assert {key[-1] for key in decoder._steps} == {"host", "select"}


# --- compile=True: the layers through torch.compile (inductor on CPU here: a C++ compiler) ------------
@pytest.mark.parametrize(
    "router, branches", [(None, "auto"), ("topk", "select"), ("threshold-p", "host"), ("threshold-p", "gather")]
)
def test_compiled_step_matches_generate(router, branches, tiny, ids, left_pad, monkeypatch):
    """compile=True: batch 1 and a left-padded batch give `model.generate`'s greedy tokens. Each
    shape compiles in its step's warm-up (inside `prefill`), never while decoding: a second prompt
    of the same shapes, and a new step of the same shapes (sampling), compile nothing."""
    model = tiny("llama") if router is None else routed(tiny("llama"), router=router)
    counter = counting_compiles(monkeypatch)
    decoder = GraphedDecoder(model, branches=branches, compile=True)
    for prompts in ([ids(1, 9, seed=3)[0]], [ids(1, n, seed=n)[0] for n in (7, 12, 4)]):
        x, mask, _ = left_pad(prompts)
        before = counter.frame_count
        decoder.prefill(x, mask, 10)
        warmed = counter.frame_count
        assert warmed > before  # this batch size compiled in the warm-up
        decoder.decode(9)
        assert counter.frame_count == warmed  # decoding compiled nothing
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=10), greedy(model, x, mask, 10))
        other = torch.where(mask.bool(), (x * 7 + 1) % 255 + 1, x)  # another prompt of the same shapes
        assert torch.equal(
            decoder.generate(other, attention_mask=mask, max_new_tokens=10), greedy(model, other, mask, 10)
        )
        assert counter.frame_count == warmed and len(decoder._steps) == len(set(decoder._steps))
    assert decoder.last_step.mode == decoder.branches_for(3)
    # a prefill in passes fills the dense layers' buffers before the warm-up, which puts back what it wrote
    step = decoder.prefill(x, mask, 10, rows_per_pass=2)
    first = step.token.clone()
    decoder.decode(9)
    assert torch.equal(torch.cat([first, step.out[:, :9]], 1), greedy(model, x, mask, 10)[:, -10:])
    assert counter.frame_count == warmed
    torch.manual_seed(1)  # a sampled step: a new step of seen shapes, whose warm-up leaves the seed alone
    drawn = decoder.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=2.0)
    assert counter.frame_count == warmed
    torch.manual_seed(1)
    plain = GraphedDecoder(model, branches=branches).generate(
        x, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=2.0
    )
    assert torch.equal(drawn, plain)


def test_compiled_step_rounds_as_eager_in_bf16(tiny, ids):
    """In bf16 the fused kernels round where the eager ones do (inductor's `emulate_precision_casts`):
    threshold-p's decisions compare a score with a cut-off, and unrounded float32 intermediates
    flipped some of them here (about one token in seven differed)."""
    model = routed(tiny("llama")).to(torch.bfloat16)
    x = ids(4, 12, seed=2)
    expected = GraphedDecoder(model).generate(x, max_new_tokens=24)
    assert torch.equal(GraphedDecoder(model, compile=True).generate(x, max_new_tokens=24), expected)


def test_compiled_step_errors(tiny, ids, monkeypatch):
    """Bad input, no torch.compile here, and a compile that fails: each one clear error."""
    from modadapt.decoding import compiled

    model = tiny("llama")
    for bad in ("inductor", 1, None):
        with pytest.raises(ModAdaptError, match="compile must be True or False"):
            GraphedDecoder(model, compile=bad)
    with monkeypatch.context() as m:
        m.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
        with pytest.raises(ModAdaptError, match="compile=False"):
            GraphedDecoder(model, compile=True)

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    decoder = GraphedDecoder(model, compile=True)
    with pytest.raises(
        ModAdaptError, match=r"torch.compile failed on the decode step.*no compiler on this machine.*compile=False"
    ):
        decoder.generate(ids(1, 5), max_new_tokens=3)
    assert torch.equal(GraphedDecoder(model).generate(ids(1, 5), max_new_tokens=3), greedy(model, ids(1, 5), None, 3))


def test_compiling_sets_the_step_s_inductor_options(monkeypatch):
    """While a step compiles: half-precision rounding as eager, the linear layers' pass and combo
    kernels (unless `COMBO_KERNELS` is off); outside, inductor's own settings."""
    from torch._inductor import config

    from modadapt.decoding import compiled
    from modadapt.decoding.fuse_linears import FuseLinears

    before = (config.combo_kernels, config.emulate_precision_casts, config.post_grad_custom_post_pass)
    for combo in (True, False):
        monkeypatch.setattr(compiled, "COMBO_KERNELS", combo)
        with compiled.StepCompiler().compiling():
            assert config.combo_kernels is (True if combo else before[0])
            assert config.emulate_precision_casts is True
            assert isinstance(config.post_grad_custom_post_pass, FuseLinears)
        assert (config.combo_kernels, config.emulate_precision_casts, config.post_grad_custom_post_pass) == before


def test_compiled_step_refuses_to_compile_after_its_warm_up(tiny, ids, monkeypatch):
    """A guard that fails after the warm-up (here: one layer put in training mode) is an error
    naming compile=False, not a silent compile while decoding (or, on CUDA, inside a capture)."""
    model = tiny("llama")
    counting_compiles(monkeypatch)
    decoder = GraphedDecoder(model, compile=True)
    decoder.prefill(ids(1, 5), None, 4)
    decoder.layers[1].module.train()
    with pytest.raises(ModAdaptError, match="compile again after its warm-up.*compile=False"):
        decoder.decode(1)
    decoder.layers[1].module.eval()
    decoder.decode(1)  # the compiled step again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_compiled_captured_graphs_match_generate_on_cuda(monkeypatch):
    """compile=True on CUDA (inductor's Triton kernels inside the captured graphs), float32,
    every branch mode: `model.generate`'s greedy tokens, and a replayed step compiles nothing.
    Run on the GPU machine: `python -m pytest tests/test_graphed_decode.py -k cuda`."""
    modes = available_branches()
    counter = counting_compiles(monkeypatch)
    for router, branches in [(None, "auto")] + [("threshold-p", b) for b in modes] + [("topk", "auto")]:
        model = build_tiny("llama") if router is None else routed(build_tiny("llama"), router)
        model = model.cuda()
        decoder = GraphedDecoder(model, branches=branches, compile=True)
        for x, mask in cuda_prompts():
            expected = greedy(model, x, mask, 40)
            got = decoder.generate(x, attention_mask=mask, max_new_tokens=40)
            assert torch.equal(got, expected), (router, branches, x.shape[0])
            assert decoder.last_step.graphs is not None
            frames = counter.frame_count
            assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=40), expected)
            assert counter.frame_count == frames


@pytest.mark.parametrize("experts_family", ["mixtral", "qwen2-moe", "qwen3-moe", "llama"])
def test_capture_kernels_swap_float32_grouped_experts_for_batched_ones_and_put_them_back(experts_family):
    """A capture runs inside `DecodeParts.capture_kernels()`: float32 experts run `batched_mm`
    there (grouped_mm loops on the host for any dtype but bf16), give the same logits, and the
    model's own implementation is back afterwards, also after an error; bf16 experts and dense
    families are left alone."""
    from modadapt.plugins import find_adapter

    model = build_tiny(experts_family).eval()
    moe = experts_family != "llama"
    own = getattr(model.config, "_experts_implementation", None)
    assert own == "grouped_mm" or not moe
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        parts = find_adapter(model).decode_parts(model)
        with parts.capture_kernels():
            assert getattr(model.config, "_experts_implementation", None) == ("batched_mm" if moe else own)
            inside = model(ids).logits
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-5)
    assert getattr(model.config, "_experts_implementation", None) == own
    with pytest.raises(RuntimeError, match="boom"), parts.capture_kernels():
        raise RuntimeError("boom")
    assert getattr(model.config, "_experts_implementation", None) == own
    if moe:
        half = build_tiny(experts_family).to(torch.bfloat16)
        with find_adapter(half).decode_parts(half).capture_kernels():
            assert half.config._experts_implementation == "grouped_mm"


def test_captures_run_with_the_garbage_collector_paused():
    """`collector_paused` (around every capture) collects once, keeps the collector off inside,
    and restores the state it found, also after an error."""
    import gc

    from modadapt.decoding.decoder import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_capture_kernels_leave_every_other_config_of_a_multimodal_mixture_as_it_was():
    """LLaVA over a Mixtral: only the text config (the one its experts read) is swapped, the
    top-level and vision configs keep their values, and every one comes back."""
    import transformers

    from modadapt.adapters.hf.decoder import _config_tree, _graph_safe_experts

    vision = modadapt.build_preset("tiny-llava").config
    text = build_tiny("mixtral").config.to_dict() | {"model_type": "mixtral"}
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision.vision_config.to_dict(), image_token_index=vision.image_token_index
    )
    model = transformers.LlavaForConditionalGeneration(config)
    configs = _config_tree(model.config)
    assert configs[0] is model.config and {id(c) for c in configs[1:]} == {
        id(model.config.text_config),
        id(model.config.vision_config),
    }
    before = {id(c): c._experts_implementation for c in configs}
    assert model.config.text_config._experts_implementation == "grouped_mm"
    with _graph_safe_experts(model):
        inside = {id(c): c._experts_implementation for c in configs}
    assert inside == before | {id(model.config.text_config): "batched_mm"}
    assert {id(c): c._experts_implementation for c in configs} == before


def test_a_capture_runs_inside_the_capture_kernels_with_the_collector_paused(tiny, ids, monkeypatch):
    """`GraphedDecoder` captures its step (plain and speculative) inside
    `DecodeParts.capture_kernels()` and with the garbage collector paused (checked on the CPU by
    standing in for the CUDA capture)."""
    import gc

    from modadapt.decoding.speculate import SpeculativeStep
    from modadapt.decoding.step import DecodeStep

    model = routed(build_tiny("mixtral").eval())
    seen = []

    def capture(step):
        seen.append((type(step).__name__, gc.isenabled(), model.config._experts_implementation))
        raise RuntimeError("stand-in capture")

    for cls in (DecodeStep, SpeculativeStep):
        monkeypatch.setattr(cls, "capture", capture)
    for speculate in (0, 2):
        decoder = GraphedDecoder(model, cuda_graphs=False, speculate=speculate)
        decoder.cuda_graphs = True  # as on CUDA, up to the capture itself
        with pytest.raises(ModAdaptError, match="capturing the decode step failed.*stand-in capture"):
            decoder.prefill(ids(1, 6), None, 4)
    assert seen == [("DecodeStep", False, "batched_mm"), ("SpeculativeStep", False, "batched_mm")]
    assert gc.isenabled() and model.config._experts_implementation == "grouped_mm"


def test_steps_run_on_the_models_device_with_the_few_row_linear_mode(monkeypatch):
    """Decode steps (run, warmed up, captured) enter the model's CUDA device, since Triton
    launches its kernels and a capture its streams on the current one (a model on another GPU
    than the current); and the few-row linear mode, unless `LINEAR_KERNEL` says cuBLAS."""
    from types import SimpleNamespace

    from torch.overrides import _get_current_function_mode_stack

    from modadapt.decoding import decode_linear

    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    for kernel, mode in (("triton", True), ("cublas", False)):
        monkeypatch.setattr(decode_linear, "LINEAR_KERNEL", kernel)
        decoder = GraphedDecoder(build_tiny("llama"))
        decoder.params = SimpleNamespace(device=torch.device("cuda", 1))
        entered.clear()
        with decoder._stepping():
            modes = _get_current_function_mode_stack()
        assert entered == [torch.device("cuda", 1)]
        assert any(isinstance(m, decode_linear.FewRowsLinear) for m in modes) == mode
