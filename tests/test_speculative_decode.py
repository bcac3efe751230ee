"""Speculative decoding (`GraphedDecoder(model, speculate=K)`): the converted model's routing
drafts, the dense computation of the same weights verifies, and the output is the dense model's.

On CPU the rounds run eagerly (the reference); the captured graphs are checked on a GPU by the
tests marked for CUDA at the end (`python -m pytest tests/test_speculative_decode.py -k cuda`)."""

from __future__ import annotations

import copy
import math

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
)

import modadapt
from modadapt.adapters.hf.versions import cache_kwarg
from modadapt.decoding import Draft, GraphedDecoder, available_branches
from modadapt.errors import ModAdaptError

pytestmark = pytest.mark.usefixtures("one_thread")

#: The graphed families but tiny-llama-tied, tiny-gemma and tiny-gpt2 (which tie their embeddings
#: too): with random tied embeddings greedy decoding gives the dense tokens whatever the routing,
#: so every draft is accepted and the acceptance checks below cannot hold (tests/test_graphed_decode.py
#: decodes all three; `test_speculative_gpt2_equals_dense_greedy` checks GPT-2's tokens alone).
UNTIED_FAMILIES = tuple(f for f in GRAPHED_FAMILIES if f not in ("llama-tied", "gemma", "gpt2"))


def _pair(family, router="threshold-p", window=None, **config):
    """(the dense model, a converted copy whose routers really skip); `window`: the sliding
    layers' window (`conftest.build_windowed`; None: out of reach)."""
    dense = build_windowed(family, window)
    model = routed(copy.deepcopy(dense), router, **config)
    # The unconverted MoE model's own load-balancing loss (the presets ask for router logits) fails
    # in transformers on generate's left-padded decode steps (a mask of every position against the
    # new token's router logits); the reference needs none.
    dense.config.output_router_logits = False
    return dense, model


@pytest.mark.parametrize(
    "graphed_family, window",
    [pytest.param(f, None, id=f) for f in UNTIED_FAMILIES]
    + [pytest.param(f, 8, id=f"{f}-window8") for f in WINDOWED_FAMILIES if f in UNTIED_FAMILIES],
)
def test_speculative_greedy_equals_dense_greedy(graphed_family, window, ids, left_pad):
    """Batch 1 and a left-padded batch, K = 1, 2, 4: the tokens of greedy decoding with the
    unconverted model, while rows accept different numbers of drafts. With a sliding window of 8
    that prompt and new tokens pass, the draft's MoD layers read their window by the positions of
    their compacted slots, the verification's K + 1 queries each their own window."""
    dense, model = _pair(graphed_family, window=window)
    x1 = ids(1, 9, seed=3)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    new = 14 if window is None else 24
    one, batch = greedy(dense, x1, None, new), greedy(dense, x, mask, new)
    assert not torch.equal(greedy(model, x, mask, new), batch)  # the routed model alone differs
    for k, draft in [(1, "routers"), (2, "routers"), (4, "routers"), (2, None), (4, None)]:
        decoder = GraphedDecoder(model, speculate=k, draft=draft)
        assert torch.equal(decoder.generate(x1, max_new_tokens=new), one), (k, draft)
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=new), batch), (k, draft)
        stats = decoder.speculation_stats()
        assert stats["k"] == k and 0 <= stats["acceptance"] < 1
        if draft == "routers":  # (the default, None, skips every MoD layer: on random weights it accepts little)
            assert stats["acceptance"] > 0
            per_row = [a / r for a, r in zip(stats["accepted"], stats["rounds"])]
            assert max(per_row) > min(per_row)  # rows accept different lengths (their positions differ)


def test_speculative_gpt2_equals_dense_greedy(ids, left_pad):
    """GPT-2 (learned positions added to the embedding, no rotary): the draft and the verification
    give the dense model's greedy tokens, batch 1 and a left-padded batch. Its tied embeddings
    accept every draft (see `UNTIED_FAMILIES`), so no acceptance is checked."""
    dense, model = _pair("gpt2")
    x1 = ids(1, 9, seed=3)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (7, 12, 4)])
    for k in (1, 4):
        decoder = GraphedDecoder(model, speculate=k, draft="routers")
        assert torch.equal(decoder.generate(x1, max_new_tokens=14), greedy(dense, x1, None, 14)), k
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=14), greedy(dense, x, mask, 14)), k


@pytest.mark.parametrize("router", ["topk", "random"])
def test_speculative_greedy_other_routers_and_branches(router, ids, left_pad):
    dense, model = _pair("llama", router=router)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (5, 10)])
    expected = greedy(dense, x, mask, 12)
    for branches in ("host", "select", "gather"):
        decoder = GraphedDecoder(model, speculate=3, branches=branches, draft="routers")
        assert torch.equal(decoder.generate(x[:1], attention_mask=mask[:1], max_new_tokens=12), expected[:1])
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=12), expected)


def test_a_draft_that_keeps_every_token_is_always_accepted(tiny, ids, left_pad):
    """A fresh conversion keeps every token, so the routers' draft computes what the dense model
    does and every draft is accepted, in every branch mode: tokens equal to the dense model's
    alone would not show a draft that skips layers its routers keep. Skipping every MoD layer
    instead drafts other tokens, and some are rejected."""
    dense = tiny("llama")
    model = modadapt.convert(copy.deepcopy(dense), router="threshold-p", layers="all-but-first").eval()
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (5, 10)])
    expected = greedy(dense, x, mask, 12)
    for branches in ("host", "select", "gather"):
        decoder = GraphedDecoder(model, speculate=3, branches=branches, draft="routers")
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=12), expected)
        assert decoder.speculation_stats()["acceptance"] == 1.0, branches
    skipping = GraphedDecoder(model, speculate=3)
    assert torch.equal(skipping.generate(x, attention_mask=mask, max_new_tokens=12), expected)
    assert skipping.speculation_stats()["acceptance"] < 1.0


def test_compiled_speculation_equals_dense_greedy(ids, left_pad, monkeypatch):
    """compile=True: the draft steps' and the verification's layers through torch.compile give
    the dense model's greedy tokens at batch 1 and in a left-padded batch; each shape compiles in
    the warm-up (inside `prefill`), the rounds compile nothing."""
    counter = counting_compiles(monkeypatch)
    dense, model = _pair("llama")
    decoder = GraphedDecoder(model, speculate=2, compile=True, draft="routers")
    for prompts in ([ids(1, 9, seed=3)[0]], [ids(1, n, seed=n)[0] for n in (7, 12, 4)]):
        x, mask, _ = left_pad(prompts)
        before = counter.frame_count
        decoder.prefill(x, mask, 12)
        warmed = counter.frame_count
        assert warmed > before
        assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=12), greedy(dense, x, mask, 12))
        assert counter.frame_count == warmed
        assert 0 < decoder.speculation_stats()["acceptance"] < 1


@pytest.mark.parametrize("stack, window", [("llama", None), ("gemma3", 4)])
def test_verifier_cache_holds_the_dense_model_cache(stack, window, ids):
    """After generating, every layer's slots `[0, base)` of each row hold the dense model's K/V of
    the row's tokens (the draft's writes were all overwritten), and nothing else is counted; a
    windowed MoD layer's slot positions there are the verified tokens' (slot s: position s)."""
    from transformers import DynamicCache

    dense, model = _pair(stack, window=window)
    x = ids(2, 8, seed=5)
    decoder = GraphedDecoder(model, speculate=3, draft="routers")  # (a draft that writes K/V at MoD layers)
    out = decoder.generate(x, max_new_tokens=11)
    step = decoder.last_step
    for b in range(2):
        base = int(step.base[b])
        assert base == 8 + int(step.count[b]) - 1  # every emitted token but the last is cached
        tokens = torch.cat([x[b], step.out[b, : base - 8]])[None]
        assert torch.equal(tokens[0, : out.shape[1]], out[b, :base])
        cache = DynamicCache()  # (no config: sliding layers keep every token too)
        with torch.no_grad():
            dense(tokens, **cache_kwarg(dense, cache), use_cache=True)
        for i, layer in enumerate(cache.layers):
            torch.testing.assert_close(step.keys[i][b, :base], layer.keys[0].transpose(0, 1))
            torch.testing.assert_close(step.values[i][b, :base], layer.values[0].transpose(0, 1))
            if step.slot_positions[i] is not None:
                assert torch.equal(step.slot_positions[i][b, :base], torch.arange(base))
    assert any(s is not None for s in step.slot_positions) == (window is not None)
    assert all(torch.equal(n, step.base) for n in step.lengths)
    allocated, used = decoder.kv_bytes()
    assert 0 < used < allocated


@pytest.mark.parametrize("both_rows_end", [False, True])
def test_speculative_stops_at_end_of_sequence(both_rows_end, monkeypatch):
    import modadapt.decoding.decoder as gd

    monkeypatch.setattr(gd, "CHECK_EVERY", 8)
    dense, model = _pair("llama")
    stops_at_end_of_sequence(dense, GraphedDecoder(model, speculate=4), both_rows_end)


def test_end_of_sequence_inside_an_accepted_draft(tiny, ids):
    """A fresh conversion keeps every token: its drafts are the dense model's and every one is
    accepted, so the end token lands in the middle of a round's emitted tokens; what follows it in
    that round is padding, as with `model.generate`."""
    dense = tiny("llama")
    model = modadapt.convert(copy.deepcopy(dense), router="threshold-p", layers="all-but-first").eval()
    x = ids(1, 7, seed=3)
    free = greedy(dense, x, None, 16)[0, 7:]
    eos = int(free[2])  # token 0 is the prefill's, tokens 1..4 the first round's drafts
    assert eos not in free[:2].tolist()
    with torch.no_grad():
        expected = dense.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    decoder = GraphedDecoder(model, speculate=4, draft="routers")
    got = decoder.generate(x, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected) and got.shape[1] == 7 + 3
    assert decoder.speculation_stats()["acceptance"] == 1.0


def test_draft_depth_knob(ids):
    """A margin keeps fewer tokens, `skip` drops whole MoD layers; the output stays the dense model's."""
    dense, model = _pair("llama")
    x = ids(2, 8, seed=7)
    expected = greedy(dense, x, None, 10)
    kept = {}
    for draft in ("routers", "margin=2", {"skip": [1, 3]}, Draft(skip="all"), "margin=-50"):
        decoder = GraphedDecoder(model, speculate=2, draft=draft)
        step = decoder.prefill(x, None, 10)
        mod = [i for i, layer in enumerate(decoder.layers) if layer.mod]
        with torch.inference_mode(), decoder.parts.static_attention():
            step.draft.run_eager()  # one draft token: which MoD layers kept it
        kept[str(decoder.draft)] = [int(step.draft.lengths[i].sum() - step.base.sum()) for i in mod]
        assert torch.equal(decoder.generate(x, max_new_tokens=10), expected), draft
    assert sum(kept["margin=2"]) < sum(kept["routers"]) < sum(kept["margin=-50"]) == 2 * 3  # 2 rows, 3 MoD layers
    assert kept["skip=1,3"][0] == kept["skip=1,3"][2] == 0 and kept["skip=all"] == [0, 0, 0]
    assert kept["skip=1,3"][1] == kept["routers"][1]


def test_draft_from_strings_and_dicts():
    assert Draft.of("routers") == Draft() and Draft.of(None) == Draft(skip="all")  # the default skips every MoD layer
    assert GraphedDecoder(_pair("llama")[1], speculate=2).draft == Draft(skip="all")
    assert Draft.of("skip=2,4;margin=0.25") == Draft(skip=(2, 4), margin=0.25)
    assert Draft.of({"skip": "all"}) == Draft(skip="all")
    for draft in (Draft(), Draft(skip=(3,), margin=-1.5), Draft(skip="all", margin=2)):
        assert Draft.of(str(draft)) == draft  # a sweep's labels read back
    for bad, match in [
        ("depth=3", "cannot read draft"),
        ("margin=x", "margin must be a number"),
        ("skip=1,b", "skip must be"),
        ({"margin": 1, "layers": [2]}, "no option 'layers'"),
        (Draft(margin=float("nan")), "finite"),
        (Draft(skip="some"), "'all'"),
        (3, "must be a"),
    ]:
        with pytest.raises(ModAdaptError, match=match):
            Draft.of(bad)


def test_speculative_bad_input(tiny, ids):
    dense, model = _pair("llama")
    for k in (-1, 1.5, True, "2"):
        with pytest.raises(ModAdaptError, match="speculate must be an int"):
            GraphedDecoder(model, speculate=k)
    with pytest.raises(ModAdaptError, match="nothing to draft from"):
        GraphedDecoder(dense, speculate=2)
    with pytest.raises(ModAdaptError, match="pass speculate"):
        GraphedDecoder(model, draft="margin=1")
    with pytest.raises(ModAdaptError, match="layer 2, which is not a MoD layer"):
        GraphedDecoder(
            modadapt.convert(tiny("llama"), router="threshold-p", layers=[1, 3]), speculate=2, draft={"skip": [2]}
        )
    attention_routed = modadapt.convert(tiny("llama"), router="attention", layers="every-other")
    with pytest.raises(ModAdaptError, match="'attention'.*captured"):
        GraphedDecoder(attention_routed, speculate=2)
    sublayer_routed = modadapt.convert(tiny("llama"), router="threshold-p", scope="mlp")
    with pytest.raises(ModAdaptError, match="scope='mlp'; decode with model.generate"):
        GraphedDecoder(sublayer_routed, speculate=2)
    decoder = GraphedDecoder(model, speculate=2)
    with modadapt.dense(model), pytest.raises(ModAdaptError, match="outside modadapt.dense"):
        decoder.generate(ids(1, 4), max_new_tokens=3)
    with pytest.raises(ModAdaptError, match="prefill"):
        decoder.decode(1)
    x = ids(1, 5)
    decoder.prefill(x, None, 4)
    decoder.decode(0)
    decoder.decode(10)  # rounds past max_new_tokens: rows that have their tokens stop advancing
    assert int(decoder.last_step.base) == 5 + int(decoder.last_step.count) - 1 and int(decoder.last_step.count) >= 4
    assert torch.equal(decoder.last_step.out[:, :4], greedy(dense, x, None, 4)[:, 5:])
    assert torch.equal(decoder.generate(x, max_new_tokens=1), greedy(dense, x, None, 1))
    assert GraphedDecoder(dense).speculation_stats() is None


def test_speculative_sampling_top_k_one_is_greedy(ids):
    dense, model = _pair("llama")
    x = ids(2, 6, seed=9)
    decoder = GraphedDecoder(model, speculate=3)
    assert torch.equal(decoder.generate(x, max_new_tokens=10, do_sample=True, top_k=1), greedy(dense, x, None, 10))
    sampling_is_seeded(decoder.generate, x, max_new_tokens=10, do_sample=True, temperature=2.0)


def test_sampled_acceptance_emits_the_target_distribution():
    """The acceptance rule alone, on made-up distributions: whatever the draft distribution, the
    first emitted token is distributed as the target's first distribution."""
    from modadapt.decoding.sampling import Sampling
    from modadapt.decoding.speculate import sampled_acceptance

    gen = torch.Generator().manual_seed(0)
    B, K, V = 200_000, 3, 6
    target = torch.randn(1, K + 1, V, generator=gen).mul(2).expand(B, -1, -1)
    q = torch.randn(K, V, generator=gen).mul(2).softmax(-1)
    drafts = torch.multinomial(q, B, replacement=True, generator=gen).T  # [B, K] drawn from q
    probs = torch.cat([q, torch.zeros(1, V)]).expand(B, -1, -1)
    torch.manual_seed(0)
    accepted, nxt = sampled_acceptance(target, drafts, probs, Sampling())
    first = torch.where(accepted > 0, drafts[:, 0], nxt[:, 0])
    empirical = torch.bincount(first, minlength=V) / B
    p = target[0, 0].softmax(-1)
    assert (empirical - p).abs().sum() / 2 < 0.01
    assert (q[0] - p).abs().sum() / 2 > 0.2  # the draft's own distribution is far from it


def _chi_square(exact: dict, counts: dict, n: int) -> tuple[float, int, int]:
    """Pearson's statistic over the outcomes (those expected fewer than 5 times pooled), its
    degrees of freedom, and how many draws fell where the exact probability is 0."""
    big = [s for s in exact if n * exact[s] >= 5]
    chi = sum((counts.get(s, 0) - n * exact[s]) ** 2 / (n * exact[s]) for s in big)
    rest_p = sum(exact[s] for s in exact if s not in big)
    rest_n = sum(counts.get(s, 0) for s in exact if s not in big)
    cells = len(big)
    if n * rest_p >= 5:
        chi, cells = chi + (rest_n - n * rest_p) ** 2 / (n * rest_p), cells + 1
    return chi, cells - 1, sum(c for s, c in counts.items() if exact.get(s, 0.0) == 0.0)


def _chi_square_bound(df: int, z: float = 3.72) -> float:
    """The chi-square quantile at 1 - 1e-4 (z = 3.72), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _tiny_vocab_model():
    """A 4-layer Llama over 5 tokens with sharp, different next-token distributions, converted
    with routers that skip a lot: a draft whose distribution is far from the dense model's."""
    from conftest import randomize_router_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=5,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model = modadapt.convert(model, router="threshold-p", layers="all-but-first")
    return randomize_router_weights(model, scale=3.0).eval()


def _exact_joint(model, prompt: list[int], sampling, n: int) -> dict:
    """The dense model's exact probability of every sequence of `n` new tokens."""
    from modadapt.decoding.sampling import sampling_logits

    vocab = model.config.vocab_size
    joint = {(): 1.0}
    with torch.no_grad(), modadapt.dense(model):
        for _ in range(n):
            prefixes = list(joint)
            logits = model(torch.tensor([prompt + list(s) for s in prefixes])).logits[:, -1]
            probs = sampling_logits(logits, sampling).softmax(-1).tolist()
            joint = {s + (x,): joint[s] * row[x] for s, row in zip(prefixes, probs) for x in range(vocab)}
    return joint


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, None), (0.8, 4, 0.9)])
def test_speculative_sampling_distribution_is_the_dense_models(temperature, top_k, top_p, monkeypatch):
    """Many seeded draws of the first three tokens (the prefill's, then a round of K = 2: the
    acceptance at both draft positions and the bonus token) against the dense model's exact
    joint distribution over the 5 x 5 x 5 outcomes, for the routers' draft and a draft that skips
    every MoD layer (most drafts rejected: the residual distribution at work). A residual drawn
    from `p` instead of `max(0, p - q)`, a common mistake, fails the same bound."""
    import modadapt.decoding.decoder as gd
    import modadapt.decoding.speculate as speculate
    from modadapt.decoding.sampling import Sampling, sampling_logits

    monkeypatch.setattr(gd, "BUCKET", 16)  # thousands of rows: a short static cache
    model = _tiny_vocab_model()
    prompt, n, draws = [1, 3, 2, 4], 3, 6000
    exact = _exact_joint(model, prompt, Sampling(temperature, top_k, top_p), n)

    def chi_square(draft):
        decoder = GraphedDecoder(model, speculate=2, draft=draft)
        torch.manual_seed(1)
        out = decoder.generate(
            torch.tensor([prompt]).expand(draws, -1),
            max_new_tokens=n,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        counts = {}
        for row in out[:, len(prompt) :].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        return (*_chi_square(exact, counts, draws), decoder.speculation_stats()["acceptance"])

    for draft in ("routers", "skip=all"):
        chi, df, outside, acceptance = chi_square(draft)
        assert outside == 0 and chi < _chi_square_bound(df), (draft, chi, df)
        assert acceptance < 0.9  # drafts do get rejected
    original = speculate.sampled_acceptance

    def residual_from_p(logits, drafts, draft_probs, sampling):
        accepted, _ = original(logits, drafts, draft_probs, sampling)
        B, T, V = logits.shape
        p = sampling_logits(logits.reshape(B * T, V), sampling).softmax(-1).view(B, T, V)
        return accepted, torch.multinomial(p.gather(1, accepted.view(B, 1, 1).expand(B, 1, V)).squeeze(1), 1)

    monkeypatch.setattr(speculate, "sampled_acceptance", residual_from_p)
    chi, df, _, _ = chi_square("skip=all")
    assert chi > 2 * _chi_square_bound(df), (chi, df)


def test_assisted_generation_with_a_converted_assistant(ids):
    """transformers' assisted decoding (`assistant_model=`) with a converted copy as the
    assistant: its greedy tokens are plain greedy decoding's."""
    dense, model = _pair("llama")
    x = ids(1, 9, seed=3)
    expected = greedy(dense, x, None, 20)
    assert not torch.equal(greedy(model, x, None, 20), expected)
    assert torch.equal(greedy(dense, x, None, 20, assistant_model=model), expected)


# --- on a GPU ---------------------------------------------------------------------------------------------------
def _modes():
    return available_branches()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("stack, window", [("llama", None), ("gemma3", 8)])
def test_captured_speculation_matches_dense_generate_on_cuda(stack, window):
    """Captured draft steps (every branch mode) and verification in float32 on CUDA give the
    dense model's greedy tokens at batch 1 and in a left-padded batch (Gemma 3: a sliding window
    of 8, which 40 new tokens pass), and captured speculative sampling is seeded by
    `torch.manual_seed`. Run on the GPU machine: `python -m pytest tests/test_speculative_decode.py -k cuda`."""
    dense = build_windowed(stack, window).cuda()
    model = routed(copy.deepcopy(dense))
    for branches in _modes():
        for k, draft in ((2, "routers"), (4, "routers"), (4, None)):  # None: every MoD layer skipped
            decoder = GraphedDecoder(model, branches=branches, speculate=k, draft=draft)
            for x, mask in cuda_prompts():
                expected = greedy(dense, x, mask, 40)
                got = decoder.generate(x, attention_mask=mask, max_new_tokens=40)
                assert decoder.last_step.graph is not None and decoder.last_step.graphs is not None
                assert torch.equal(got, expected), (branches, k, x.shape[0], decoder.last_step.mode)
                sampling_is_seeded(
                    decoder.generate, x, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=2.0
                )
        keep_all = modadapt.convert(copy.deepcopy(dense), router="threshold-p", layers="all-but-first").eval()
        decoder = GraphedDecoder(keep_all, branches=branches, speculate=4, draft="routers")
        for x, mask in cuda_prompts():  # captured drafts that keep every token: every one accepted
            assert torch.equal(decoder.generate(x, attention_mask=mask, max_new_tokens=40), greedy(dense, x, mask, 40))
            assert decoder.speculation_stats()["acceptance"] == 1.0, (branches, x.shape[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_compiled_captured_speculation_matches_dense_generate_on_cuda():
    """compile=True on CUDA: the captured draft steps (every branch mode) and verification replay
    inductor's kernels and give the dense model's greedy tokens in float32."""
    dense = build_tiny("llama").cuda()
    model = routed(copy.deepcopy(dense))
    for branches in _modes():
        decoder = GraphedDecoder(model, branches=branches, speculate=2, compile=True, draft="routers")
        for x, mask in cuda_prompts():
            got = decoder.generate(x, attention_mask=mask, max_new_tokens=40)
            assert decoder.last_step.graph is not None and decoder.last_step.graphs is not None
            assert torch.equal(got, greedy(dense, x, mask, 40)), (branches, x.shape[0], decoder.last_step.mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_captured_speculation_equals_its_eager_rounds_in_bf16():
    """In bf16 draft and verification attend with flash (used lengths; causal among the K + 1
    queries of a verification); the captured graphs replay the kernels the eager rounds run."""
    from modadapt.decoding import static_cache

    model = routed(build_tiny("llama")).cuda().to(torch.bfloat16)
    x, mask = cuda_prompts()[1]
    for batch in (1, 3):
        eager = GraphedDecoder(model, cuda_graphs=False, speculate=3, draft="routers").generate(
            x[:batch], attention_mask=mask[:batch], max_new_tokens=40
        )
        for branches in _modes():
            graphed = GraphedDecoder(model, branches=branches, speculate=3, draft="routers")
            assert torch.equal(graphed.generate(x[:batch], attention_mask=mask[:batch], max_new_tokens=40), eager)
    assert any(static_cache._FLASH.values()), "the flash decode attention did not run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention on CUDA")
def test_flash_verification_attention_matches_the_masked_fallback_on_cuda():
    """Flash's causal mask with per-row used lengths is aligned to each row's end, as the
    verification needs (query t of a row sees slots up to `used - T + t`)."""
    from modadapt.decoding.static_cache import KeyLengths

    gen = torch.Generator().manual_seed(0)
    B, H, Hk, d, cap, T = 8, 8, 2, 64, 256, 5
    q = torch.randn(B, H, T, d, generator=gen).cuda().bfloat16()
    k, v = (torch.randn(B, cap, Hk, d, generator=gen).cuda().bfloat16() for _ in range(2))
    used = torch.randint(T, cap, (B,), generator=gen).cuda().int()
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    lengths = KeyLengths(used, cu * T, cu * cap, queries=T)
    flash, reference = flash_and_fallback(q, k, v, lengths, d**-0.5)
    assert (flash - reference).norm() / reference.norm() < 1e-2
