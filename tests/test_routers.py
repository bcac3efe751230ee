"""Unit tests of the router framework (`select_topk`, `pack_mask`) and the built-in routers."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from modadapt.routers.base import RoutingContext, pack_mask, select_topk, topk_boundary
from modadapt.routers.random import RandomRouter
from modadapt.routers.threshold import ThresholdRouter
from modadapt.routers.topk import TopKRouter

HIDDEN = 16


def exact_kept(capacity: float, n: int) -> int:
    """ceil(capacity * n) in exact arithmetic (the capacity as the user wrote it)."""
    return math.ceil(Fraction(str(capacity)) * n)


def ctx_for(B, T, *, real=None, forced=None, causal=False, training=True, positions=None, layer_index=1):
    if positions is None:
        positions = torch.arange(T).expand(B, T)
    return RoutingContext(
        layer_index=layer_index, real=real, forced=forced, positions=positions, causal=causal, training=training
    )


def left_padded_real(lengths, T):
    real = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        real[row, T - n :] = True
    return real


def assert_packed(indices, valid, keep):
    """indices/valid/keep are consistent: valid slots hold exactly the kept tokens, ascending;
    filler slots hold distinct tokens that are not kept."""
    B = keep.shape[0]
    slots = indices.shape[1]
    counts = keep.sum(1)
    if valid is None:
        assert torch.all(counts == slots)
        valid = torch.ones_like(indices, dtype=torch.bool)
    assert valid.shape == indices.shape
    for row in range(B):
        n = int(counts[row])
        assert valid[row].tolist() == [True] * n + [False] * (slots - n)
        kept_positions = keep[row].nonzero().flatten()
        assert torch.equal(indices[row, :n], kept_positions)  # ascending, exactly the kept tokens
        assert len(set(indices[row].tolist())) == slots  # distinct: scattering fillers is harmless
        assert not keep[row, indices[row, n:]].any()


# --- select_topk ---------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0.01, 0.1, 0.25, 0.3, 0.5, 0.9, 1.0])
def test_select_topk_without_padding_is_sorted_topk(capacity):
    torch.manual_seed(0)
    B, T = 3, 20
    logits = torch.randn(B, T)
    indices, valid, keep = select_topk(logits, capacity, None, None)
    k = exact_kept(capacity, T)
    assert indices.shape == (B, k)
    assert valid is None
    assert torch.equal(indices, indices.sort(dim=1).values)
    expected = logits.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(indices, expected)
    assert torch.equal(keep, torch.zeros(B, T, dtype=torch.bool).scatter(1, expected, True))


@pytest.mark.parametrize("capacity", [0.1, 0.125, 0.25, 0.27, 0.3, 0.5, 0.75, 1.0])
def test_select_topk_padded_row_keeps_what_it_keeps_alone(capacity):
    """Each left-padded row keeps ceil(capacity * n_real) tokens: the same ones as the row alone."""
    torch.manual_seed(1)
    for T in (7, 11, 19, 25, 30):
        lengths = sorted({1, 2, T // 3, T // 2, T - 1, T} - {0})
        real = left_padded_real(lengths, T)
        logits = torch.randn(len(lengths), T)
        indices, valid, keep = select_topk(logits, capacity, real, None)
        assert indices.shape[1] == exact_kept(capacity, T)  # the static slot count
        assert not keep[~real].any()
        assert_packed(indices, valid, keep)
        for row, n in enumerate(lengths):
            _, _, alone = select_topk(logits[row : row + 1, T - n :], capacity, None, None)
            assert int(keep[row].sum()) == exact_kept(capacity, n), (T, n)
            assert torch.equal(keep[row, T - n :], alone[0]), (T, n)


def test_select_topk_all_real_mask_equals_no_mask():
    torch.manual_seed(2)
    for T in (25, 29, 41):
        logits = torch.randn(2, T)
        for capacity in (0.27, 0.28, 0.3, 0.56):
            plain = select_topk(logits, capacity, None, None)
            masked = select_topk(logits, capacity, torch.ones(2, T, dtype=torch.bool), None)
            assert torch.equal(masked[2], plain[2]), (T, capacity)
            assert torch.equal(masked[0], plain[0]), (T, capacity)


def test_select_topk_forced_tokens_always_kept_and_not_counted():
    torch.manual_seed(3)
    B, T, capacity = 2, 12, 0.25
    logits = torch.randn(B, T)
    real = left_padded_real([12, 8], T)
    forced = torch.zeros(B, T, dtype=torch.bool)
    forced[:, 5] = True  # a real token in both rows
    forced[0, 11] = True
    forced[1, 1] = True  # padding: must still never be kept
    logits[forced] = -100.0  # the worst scores: kept only because they are forced
    indices, valid, keep = select_topk(logits, capacity, real, forced)
    assert_packed(indices, valid, keep)
    assert not keep[~real].any()
    assert keep[forced & real].all()
    for row in range(B):
        eligible = real[row] & ~forced[row]
        chosen = keep[row] & eligible
        assert int(chosen.sum()) == exact_kept(capacity, int(eligible.sum()))
        # the chosen eligible tokens are the best-scoring eligible ones
        worst_chosen = logits[row][chosen].min()
        best_unchosen = logits[row][eligible & ~chosen].max()
        assert worst_chosen > best_unchosen


def test_select_topk_zero_rows_and_full_capacity():
    logits = torch.randn(2, 6)
    real = left_padded_real([6, 0], 6)
    indices, valid, keep = select_topk(logits, 1.0, real, None)
    assert keep[0].all() and not keep[1].any()
    assert_packed(indices, valid, keep)


# --- pack_mask -----------------------------------------------------------------------------


def test_pack_mask_filler_slots_are_invalid():
    keep = torch.tensor(
        [
            [0, 1, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    indices, valid, out = pack_mask(keep, None, None)
    assert torch.equal(out, keep)
    assert indices.shape == (3, 3)
    assert valid is not None
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert indices[0].tolist() == [1, 3, 4]
    assert indices[1, 0].item() == 4
    assert_packed(indices, valid, keep)


def test_pack_mask_equal_counts_need_no_valid_mask():
    keep = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    indices, valid, _ = pack_mask(keep, None, None)
    assert valid is None
    assert indices.tolist() == [[0, 2], [1, 2]]


def test_pack_mask_applies_padding_and_forced_tokens():
    keep = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    real = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    forced = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    indices, valid, out = pack_mask(keep, real, forced)
    # padding (row 0, position 0) is dropped even though kept and forced; forced real tokens are added
    assert out.tolist() == [[False, True, True, False, True], [True, True, False, True, False]]
    assert_packed(indices, valid, out)


def test_pack_mask_with_explicit_slot_count():
    keep = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    indices, valid, _ = pack_mask(keep, None, None, slots=3)
    assert indices.shape == (2, 3)
    assert valid.tolist() == [[True, True, False], [True, False, False]]
    assert_packed(indices, valid, keep)


# --- threshold-p ---------------------------------------------------------------------------


def _randomized(router, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.scorer.weight.copy_(torch.randn(router.scorer.weight.shape, generator=generator) * scale)
    return router


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_threshold_fresh_router_keeps_every_token(p):
    router = ThresholdRouter(HIDDEN, 1.0, 1, p=p)
    hidden = torch.randn(2, 9, HIDDEN)
    for causal, training in ((True, False), (False, True)):
        decision = router.route(hidden, ctx_for(2, 9, causal=causal, training=training))
        assert decision.keep.all()


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_threshold_keeps_tokens_whose_gate_reaches_p(p):
    router = _randomized(ThresholdRouter(HIDDEN, 1.0, 1, p=p))
    hidden = torch.randn(3, 20, HIDDEN)
    with torch.no_grad():
        decision = router.route(hidden, ctx_for(3, 20, causal=True, training=False))
    gate = torch.sigmoid(decision.logits)
    assert decision.keep[gate >= p + 1e-5].all()
    assert not decision.keep[gate < p - 1e-5].any()
    assert decision.keep.any() and (~decision.keep).any()
    assert_packed(decision.indices, decision.valid, decision.keep)
    assert decision.aux_loss is None  # no auxiliary loss outside training


def test_threshold_gates():
    hidden = torch.randn(2, 10, HIDDEN)
    straight = _randomized(ThresholdRouter(HIDDEN, 1.0, 1))
    decision = straight.route(hidden, ctx_for(2, 10))
    assert decision.gate is not None
    assert torch.equal(decision.gate, torch.ones_like(decision.gate))  # exactly one in value ...
    decision.gate.sum().backward()  # ... with the gradient of the sigmoid gate
    assert straight.scorer.weight.grad.abs().sum() > 0

    sigmoid = _randomized(ThresholdRouter(HIDDEN, 1.0, 1, gate="sigmoid"))
    decision = sigmoid.route(hidden, ctx_for(2, 10))
    expected = torch.sigmoid(decision.logits.gather(1, decision.indices))
    torch.testing.assert_close(decision.gate, expected)


@pytest.mark.parametrize("target", [None, 0.3, 0.9])
@pytest.mark.parametrize("padded", [False, True])
def test_threshold_aux_loss_is_alpha_times_f_minus_target_times_g(padded, target):
    alpha = 0.3
    router = _randomized(ThresholdRouter(HIDDEN, 1.0, 2, alpha=alpha, target="none" if target is None else target))
    B, T = 3, 14
    hidden = torch.randn(B, T, HIDDEN)
    real = left_padded_real([14, 9, 5], T) if padded else None
    decision = router.route(hidden, ctx_for(B, T, real=real))
    assert decision.aux_loss is not None

    gate = torch.sigmoid(decision.logits)
    mask = real if real is not None else torch.ones(B, T, dtype=torch.bool)
    keep = gate >= 0.5
    kept_fraction = (keep & mask).sum().item() / mask.sum().item()  # F: a number, no gradient
    assert torch.equal(decision.keep, keep & mask)
    mean_gate = gate[mask].mean()  # G: with gradient
    expected = alpha * (kept_fraction - (target or 0.0)) * mean_gate
    torch.testing.assert_close(decision.aux_loss, expected, rtol=1e-6, atol=1e-7)

    # the gradient flows through G only (F is a constant): it lowers the gates while F is above
    # the target and raises them below it
    (grad,) = torch.autograd.grad(decision.aux_loss, router.scorer.bias, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, router.scorer.bias)
    torch.testing.assert_close(grad, expected_grad)
    assert (grad.item() > 0) == (kept_fraction > (target or 0.0))


def test_threshold_target_brings_a_collapsed_layer_back():
    """All gates below p: MoDification's loss has no gradient left (F = 0); a target raises them."""
    hidden = torch.randn(2, 16, HIDDEN)
    for target, revives in (("none", False), (0.5, True)):
        router = ThresholdRouter(HIDDEN, 1.0, 1, alpha=1.0, target=target)
        with torch.no_grad():
            router.scorer.bias.fill_(-3.0)
        optimizer = torch.optim.SGD(router.parameters(), lr=50.0)
        for _ in range(20):
            decision = router.route(hidden, ctx_for(2, 16))
            if decision.aux_loss.requires_grad:
                optimizer.zero_grad()
                decision.aux_loss.backward()
                optimizer.step()
        assert bool(router.route(hidden, ctx_for(2, 16)).keep.any()) == revives


def test_threshold_without_alpha_has_no_aux_loss():
    router = _randomized(ThresholdRouter(HIDDEN, 1.0, 1, alpha=0.0))
    decision = router.route(torch.randn(1, 5, HIDDEN), ctx_for(1, 5))
    assert decision.aux_loss is None


# --- topk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_topk_aux_bce_target_is_the_topk_choice(padded):
    coef = 0.2
    router = _randomized(TopKRouter(HIDDEN, 0.25, 1, aux_coef=coef))
    B, T = 3, 16
    hidden = torch.randn(B, T, HIDDEN)
    real = left_padded_real([16, 11, 6], T) if padded else None
    decision = router.route(hidden, ctx_for(B, T, real=real))

    logits = decision.logits
    mask = real if real is not None else torch.ones(B, T, dtype=torch.bool)
    expected_keep = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):
        n = int(mask[row].sum())
        scores = logits[row].masked_fill(~mask[row], float("-inf"))
        expected_keep[row, scores.topk(exact_kept(0.25, n)).indices] = True
    assert torch.equal(decision.keep, expected_keep)

    bce = F.binary_cross_entropy_with_logits(logits, expected_keep.float(), reduction="none")
    expected = coef * bce[mask].mean()
    torch.testing.assert_close(decision.aux_loss, expected, rtol=1e-6, atol=1e-7)


def test_topk_causal_rule_and_no_aux_when_causal():
    router = _randomized(TopKRouter(HIDDEN, 0.5, 1))
    hidden = torch.randn(2, 12, HIDDEN)
    decision = router.route(hidden, ctx_for(2, 12, causal=True, training=True))
    assert torch.equal(decision.keep, decision.logits >= 0)
    assert decision.aux_loss is None
    assert TopKRouter(HIDDEN, 0.5, 1, aux_coef=0.0).route(hidden, ctx_for(2, 12)).aux_loss is None


def test_topk_predictor_rule_trains_on_detached_hidden_states():
    router = _randomized(TopKRouter(HIDDEN, 0.5, 1, causal_rule="predictor", predictor_hidden=8))
    with torch.no_grad():
        router.predictor[-1].weight.normal_()
    hidden = torch.randn(2, 12, HIDDEN, requires_grad=True)
    decision = router.route(hidden, ctx_for(2, 12))
    rule_logits = router.predictor(hidden.detach()).squeeze(-1)
    expected = router.aux_coef * F.binary_cross_entropy_with_logits(rule_logits, decision.keep.float())
    torch.testing.assert_close(decision.aux_loss, expected, rtol=1e-6, atol=1e-7)
    (hidden_grad, *param_grads) = torch.autograd.grad(
        decision.aux_loss, [hidden, *router.predictor.parameters()], allow_unused=True
    )
    assert hidden_grad is None  # a stop-gradient predictor: the aux loss never reaches the model
    assert all(g is not None and g.abs().sum() > 0 for g in param_grads)
    # at decode the predictor decides, cut at the top-k boundary that training saw
    causal = router.route(hidden.detach(), ctx_for(2, 12, causal=True, training=False))
    assert int(router.calibration_steps) == 1
    assert torch.equal(causal.keep, rule_logits.detach() >= router.calibrated_threshold)


@pytest.mark.parametrize("rule", ["aux", "predictor"])
@pytest.mark.parametrize("padded", [False, True])
def test_topk_causal_rule_is_calibrated_to_the_capacity(rule, padded):
    """Training records the rule statistic's top-k boundary; the causal rule then keeps about the
    capacity, where the paper's fixed cut-off (0) keeps whatever the statistic's offset says."""
    torch.manual_seed(3)
    capacity, B, T = 0.125, 4, 64
    router = _randomized(TopKRouter(HIDDEN, capacity, 1, causal_rule=rule, predictor_hidden=8))
    with torch.no_grad():
        router.scorer.bias.fill_(-30.0)  # every score negative: sigmoid < 0.5 everywhere
        if rule == "predictor":
            router.predictor[-1].weight.normal_()
            router.predictor[-1].bias.fill_(-30.0)
    real = left_padded_real([64, 64, 40, 50], T) if padded else None
    hidden = torch.randn(B, T, HIDDEN)
    fixed = TopKRouter(HIDDEN, capacity, 1, causal_rule=rule, predictor_hidden=8, causal_threshold=0)
    fixed.load_state_dict(router.state_dict())
    for _ in range(3):
        router.route(hidden, ctx_for(B, T, real=real))
    assert int(router.calibration_steps) == 3
    mask = real if real is not None else torch.ones(B, T, dtype=torch.bool)
    kept = router.route(hidden, ctx_for(B, T, real=real, causal=True, training=False)).keep
    assert abs(kept[mask].float().mean().item() - capacity) < 0.05
    assert fixed.route(hidden, ctx_for(B, T, real=real, causal=True, training=False)).keep.sum() == 0
    # the calibration is part of the state (saved, loaded, moved with the model)
    assert {"calibrated_threshold", "calibration_steps"} <= set(router.state_dict())


def test_calibrated_cutoff_keeps_the_capacity_of_tokens_pooled_over_rows():
    """One cut-off for every token: the one that keeps `capacity` of the batch's eligible tokens.
    Rows whose scores sit at different levels make each row's own boundary, averaged, keep
    another share (here 25% at capacity 20%; 19.7% at 23.1% on the quality benchmark)."""
    stat = torch.stack([torch.arange(10.0), torch.arange(10.0) * 10])  # row 2 ten times row 1
    everywhere = torch.ones_like(stat, dtype=torch.bool)
    cut = topk_boundary(stat, 0.2, everywhere)
    assert float(cut) == 60.0 and (stat >= cut).float().mean() == 0.2  # 90, 80, 70, 60 of 20
    per_row = (8.0 + 80.0) / 2  # each row's 2nd largest, averaged: keeps 50..90, 25%
    assert (stat >= per_row).float().mean() == 0.25
    # padding and unrouted tokens do not count; no eligible token, or none kept: NaN
    eligible = everywhere.clone()
    eligible[1, 5:] = False  # row 2 has 0, 10, 20, 30, 40: 15 eligible, 3 kept: 40, 30, 20
    assert float(topk_boundary(stat, 0.2, eligible)) == 20.0
    assert torch.isnan(topk_boundary(stat, 0.2, torch.zeros_like(everywhere)))
    assert torch.isnan(topk_boundary(stat, 0.0, everywhere))
    # a router whose rows differ keeps the capacity at inference after its training steps
    torch.manual_seed(0)
    router = _randomized(TopKRouter(HIDDEN, 0.25, 1))
    hidden = torch.randn(8, 64, HIDDEN) * torch.linspace(0.2, 3.0, 8)[:, None, None]
    for _ in range(4):
        router.route(hidden, ctx_for(8, 64))
    kept = router.route(hidden, ctx_for(8, 64, causal=True, training=False)).keep
    assert abs(kept.float().mean().item() - 0.25) < 0.01


def test_topk_calibration_skips_rows_without_routed_tokens():
    router = _randomized(TopKRouter(HIDDEN, 0.5, 1))
    real = torch.zeros(2, 6, dtype=torch.bool)
    router.route(torch.randn(2, 6, HIDDEN), ctx_for(2, 6, real=real))
    assert int(router.calibration_steps) == 0 and float(router.calibrated_threshold) == 0.0


def test_cached_causal_cutoff_follows_buffer_changes():
    """Decoding reuses the resolved cut-off; any change to the calibration buffers (a training
    step, load_state_dict) must show at once."""
    router = _randomized(TopKRouter(HIDDEN, 0.5, 1)).eval()
    assert float(router.causal_threshold(1)) == 0.0  # the fallback before any training step
    router.route(torch.randn(2, 8, HIDDEN), ctx_for(2, 8))  # a training-time top-k calibrates
    calibrated = float(router.calibrated_threshold)
    assert float(router.causal_threshold(1)) == calibrated != 0.0
    router.load_state_dict({**router.state_dict(), "calibrated_threshold": torch.tensor([1.25])})
    assert float(router.causal_threshold(1)) == 1.25
    with torch.no_grad():
        router.calibration_steps.zero_()
    assert float(router.causal_threshold(1)) == 0.0


# --- random --------------------------------------------------------------------------------


def test_random_causal_rule_depends_only_on_position():
    router = RandomRouter(HIDDEN, 0.5, 1)
    T = 40
    a = router.route(torch.randn(2, T, HIDDEN), ctx_for(2, T, causal=True, training=False))
    b = router.route(torch.randn(2, T, HIDDEN), ctx_for(2, T, causal=True, training=False))
    assert torch.equal(a.keep, b.keep)  # the hidden states do not matter
    assert torch.equal(a.keep[0], a.keep[1])  # the same positions decide the same in every row
    assert a.keep.any() and (~a.keep).any()
    assert a.gate is None
    # causal: a prefix decides as in the full sequence, and one decode step at position p too
    prefix = router.route(torch.randn(1, 15, HIDDEN), ctx_for(1, 15, causal=True, training=False))
    assert torch.equal(prefix.keep[0], a.keep[0, :15])
    for p in (15, 27, 39):
        step = router.route(
            torch.randn(1, 1, HIDDEN), ctx_for(1, 1, causal=True, training=False, positions=torch.tensor([[p]]))
        )
        assert bool(step.keep[0, 0]) == bool(a.keep[0, p])
    # shifted positions (a left-padded row) decide by their position ids, not their index
    shifted = router.route(
        torch.randn(1, 10, HIDDEN), ctx_for(1, 10, causal=True, training=False, positions=torch.arange(5, 15)[None])
    )
    assert torch.equal(shifted.keep[0], a.keep[0, 5:15])


def test_random_causal_rule_is_deterministic_and_keyed():
    T = 4096
    ctx = ctx_for(1, T, causal=True, training=False)
    hidden = torch.zeros(1, T, HIDDEN)
    base = RandomRouter(HIDDEN, 0.25, 1, seed=0).route(hidden, ctx).keep
    assert torch.equal(RandomRouter(HIDDEN, 0.25, 1, seed=0).route(hidden, ctx).keep, base)
    assert not torch.equal(RandomRouter(HIDDEN, 0.25, 1, seed=1).route(hidden, ctx).keep, base)
    other_layer = ctx_for(1, T, causal=True, training=False, layer_index=3)
    assert not torch.equal(RandomRouter(HIDDEN, 0.25, 3, seed=0).route(hidden, other_layer).keep, base)
    assert abs(base.float().mean().item() - 0.25) < 0.03


def test_random_training_resamples_at_capacity():
    router = RandomRouter(HIDDEN, 0.3, 1)
    hidden = torch.zeros(2, 20, HIDDEN)
    torch.manual_seed(5)
    first = router.route(hidden, ctx_for(2, 20)).keep
    second = router.route(hidden, ctx_for(2, 20)).keep
    torch.manual_seed(5)
    again = router.route(hidden, ctx_for(2, 20)).keep
    assert torch.equal(first, again)  # reproducible under the global seed
    assert not torch.equal(first, second)  # fresh draws every forward
    assert first.sum(1).tolist() == [exact_kept(0.3, 20)] * 2
    assert first.sum(1).tolist() == second.sum(1).tolist()


def test_random_without_resampling_is_fixed_topk_of_position_hash():
    router = RandomRouter(HIDDEN, 0.3, 1, resample=False)
    hidden = torch.zeros(2, 20, HIDDEN)
    first = router.route(hidden, ctx_for(2, 20))
    second = router.route(hidden, ctx_for(2, 20))
    assert torch.equal(first.keep, second.keep)
    expected = first.logits.topk(exact_kept(0.3, 20), dim=1).indices.sort(dim=1).values
    assert torch.equal(first.indices, expected)
    assert first.aux_loss is None


def test_shared_vl_causal_rule_is_calibrated_unless_fixed():
    from modadapt.routers.shared_vl import SharedVLRouter

    torch.manual_seed(4)
    hidden = torch.randn(3, 40, HIDDEN)
    calibrated, paper = SharedVLRouter(HIDDEN, 0.3, 1), SharedVLRouter(HIDDEN, 0.3, 1, causal_threshold=0)
    with torch.no_grad():
        calibrated.classifier.weight.normal_()
        calibrated.classifier.bias.copy_(torch.tensor([20.0, 0.0]))  # p_process ~ 0 everywhere
    paper.load_state_dict(calibrated.state_dict())
    calibrated.route(hidden, ctx_for(3, 40))
    assert paper.route(hidden, ctx_for(3, 40)).keep.sum() == 3 * 12  # top-k in training: ceil(0.3 * 40) per row
    kept = calibrated.route(hidden, ctx_for(3, 40, causal=True, training=False)).keep.float().mean().item()
    assert abs(kept - 0.3) < 0.05
    assert not paper.route(hidden, ctx_for(3, 40, causal=True, training=False)).keep.any()


@pytest.mark.parametrize("kind", ["topk", "shared-vl"])
def test_calibrated_causal_rule_at_capacity_one_keeps_everything(kind):
    """Capacity 1 skips nothing in training, so its causal rule must not skip either (the dense
    baseline of benchmarks/llava_digits.py is shared-vl at capacity 1)."""
    from modadapt.routers.shared_vl import SharedVLRouter

    torch.manual_seed(5)
    router = TopKRouter(HIDDEN, 1.0, 1) if kind == "topk" else SharedVLRouter(HIDDEN, 1.0, 1)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()
    hidden = torch.randn(2, 30, HIDDEN)
    assert router.route(hidden, ctx_for(2, 30)).keep.all()
    assert int(router.calibration_steps) == 0  # nothing to calibrate against
    assert router.route(hidden, ctx_for(2, 30, causal=True, training=False)).keep.all()


def test_topk_gate_gradient_is_bounded():
    """The gate is 1 in value with sigmoid's gradient, which vanishes for runaway logits (the raw
    logit's gradient did not, and a GPU adaptation run diverged)."""
    router = TopKRouter(HIDDEN, 0.5, 1)
    logits = torch.tensor([[0.0, 2.0, -3.0, 400.0]], requires_grad=True)
    gate = router.gate(logits)
    assert torch.equal(gate, torch.ones_like(gate))
    gate.sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, s * (1 - s))
    assert logits.grad[0, 3] == 0


def test_routed_tokens_exclude_padding_forced_and_prefix():
    real = left_padded_real([4, 2], 5)
    forced = torch.zeros(2, 5, dtype=torch.bool)
    forced[0, 3] = True
    ctx = RoutingContext(
        layer_index=1,
        real=real,
        forced=forced,
        positions=torch.arange(5).expand(2, 5),
        causal=False,
        training=True,
        prefix=2,
    )
    assert ctx.routed().tolist() == [[False, False, True, False, True], [False, False, False, True, True]]
    assert ctx_for(2, 3).routed().all()
