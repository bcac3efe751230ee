"""Integrated MoDE: `noop-expert` adds a no-op expert to a mixture of experts' router.

A slot whose expert's logit is below the no-op expert's adds nothing; a token none of whose slots
runs skips the MLP. Checked: a fresh conversion is the original model, the no-op share follows the
capacity (exactly while training, after calibration in eval), the router's load loss and the
experts' load-balancing loss are both in `loss` and reported apart, the experts' loss and counts
take real tokens and running slots only (a hand reference from the router calls, watched by the
test's own hooks), decoding equals a full forward, persistence and unload, FLOPs, and the errors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import MOE_FAMILIES, expert_routers, lm_loss, watching_expert_routers

import modadapt
from modadapt.cli import main
from modadapt.mod_layer import state_of
from modadapt.testing import AdapterConformance

pytestmark = pytest.mark.usefixtures("one_thread")


def _convert(model, capacity=0.5, layers="all-but-first", scale=0.05, **config):
    """`noop-expert` with a small random no-op row, so that its logit varies per token."""
    modadapt.convert(model, router="noop-expert", capacity=capacity, layers=layers, **config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in modadapt.mod_layers(model):
            layer.router.scorer.weight.copy_(torch.randn(layer.router.scorer.weight.shape, generator=generator) * scale)
    return model


def _calibrate(model, ids, steps=6):
    """Training forwards (no optimizer step) on fresh batches: the cut-offs are calibrated."""
    model.train()
    for step in range(steps):  # with gradients enabled: a training forward (no backward needed)
        x = ids(4, 16, seed=100 + step)
        model(x, labels=x)
    return model.eval()


def _slots(out):
    """What these tests watch of an experts' router call: logits, indices, and the slots dropped to
    the no-op expert (None where it has none)."""
    return out[0].detach(), out[2], getattr(out, "dropped_slots", None)


def _noop_fraction(model):
    rows = [row for row in modadapt.expert_stats(model) if "noop_fraction" in row]
    slots = sum(row["noop_slots"] for row in rows)
    total = sum(2 * (row["tokens"] + passed) for row, passed in zip(rows, _passed(model)))
    return slots / total


def _passed(model):
    return [int((~layer.mod_state.last_keep).sum()) for layer in modadapt.mod_layers(model)]


@pytest.mark.parametrize("moe_family", MOE_FAMILIES)
def test_fresh_conversion_is_the_original_model(moe_family, tiny, ids, left_pad):
    """Before any training step the cut-off is -inf: no slot goes to the no-op expert (eval, with
    padding, and while generating). At capacity 1 a training forward is the original too, and so
    is the experts' loss (transformers' own). Bit for bit without padding; with padding the MLP
    runs on the real tokens only (other matmul shapes), so real positions agree to float noise."""
    dense = tiny(moe_family)
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (5, 12, 8)])
    labels = x.masked_fill(mask == 0, -100)
    real = mask.bool()
    unpadded = ids(2, 12)
    with torch.no_grad():
        expected = dense(x, attention_mask=mask, position_ids=pos, labels=labels)
        expected_unpadded = dense(unpadded).logits
        # (transformers' own experts' loss fails on a padded decode step: not asked for here)
        generated = dense.generate(
            x, attention_mask=mask, max_new_tokens=5, do_sample=False, output_router_logits=False
        )
    model = _convert(tiny(moe_family))  # the same seeded weights
    assert state_of(model).config.scope == "mlp"  # the default 'block' means the MLP for this router
    with torch.no_grad():
        assert torch.equal(model(unpadded).logits, expected_unpadded)
        out = model(x, attention_mask=mask, position_ids=pos, labels=labels)
        torch.testing.assert_close(out.logits[real], expected.logits[real], rtol=0, atol=1e-5)
        assert all(row["noop_slots"] == 0 for row in modadapt.expert_stats(model) if "noop_slots" in row)
        assert torch.equal(model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False), generated)

    full = _convert(tiny(moe_family), capacity=1.0).train()
    with torch.no_grad():
        out = full(x, attention_mask=mask, position_ids=pos, labels=labels)
    dense.train()
    with torch.no_grad():
        reference = dense(x, attention_mask=mask, position_ids=pos, labels=labels)
    torch.testing.assert_close(out.logits[real], reference.logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, reference.aux_loss, rtol=1e-6, atol=1e-6)
    assert _noop_fraction(full) == 0.0


@pytest.mark.parametrize("capacity", [0.25, 0.5, 0.75])
def test_noop_share_follows_the_capacity(capacity, tiny, ids):
    """Training: exactly `1 - capacity` of the real slots go to the no-op expert (up to the
    rounding of `ceil`); evaluation on other text, after calibration: close to it."""
    model = _convert(tiny("mixtral"), capacity=capacity).train()
    x = ids(4, 16, seed=7)
    model(x, labels=x)
    slots = 4 * 16 * 2
    expected = (slots - math.ceil(capacity * slots)) / slots
    assert _noop_fraction(model) == pytest.approx(expected, abs=1e-9)
    assert all(row["noop_fraction"] == pytest.approx(expected) for row in modadapt.expert_stats(model)[1:])

    _calibrate(model, ids)
    with torch.no_grad():
        model(ids(4, 16, seed=999))
    assert _noop_fraction(model) == pytest.approx(1 - capacity, abs=0.12)
    assert 0 < sum(_passed(model))  # some tokens skipped the MLP outright
    for layer in modadapt.mod_layers(model):
        assert int(layer.router.calibration_steps[0]) == 7


@pytest.mark.parametrize("moe_family", MOE_FAMILIES)
def test_losses_and_counts_take_real_tokens_and_running_slots(moe_family, tiny, ids, left_pad):
    """Training with padding: the experts' loss and counts are those of the real rows their
    router saw, minus the slots it gave the no-op expert; the no-op share counts the slots of the
    tokens that skipped the MLP too; `loss` is the LM loss plus both auxiliary losses, apart."""
    model = _convert(tiny(moe_family), capacity=0.5, router_kwargs={"alpha": 0.5}, packing="padded")
    _calibrate(model, ids, steps=2)
    model.train()
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (5, 12, 8)])
    labels = x.masked_fill(mask == 0, -100)
    real = mask.bool()
    with watching_expert_routers(model, _slots) as calls:
        out = model(x, attention_mask=mask, position_ids=pos, labels=labels)

    keeps = {layer.mod_state.index: layer.mod_state.last_keep for layer in modadapt.mod_layers(model)}
    experts, top_k = 4, 2
    assigned, probability, rows, stats = torch.zeros(experts), torch.zeros(experts), 0, []
    for index, logits, indices, dropped in calls:
        if index in keeps:  # each row's kept tokens first, then filler slots
            counts = (keeps[index] & real).sum(1)
            width = int(counts.max())
            valid = (torch.arange(width)[None] < counts[:, None]).reshape(-1)
            assert dropped is not None and logits.shape[0] == 3 * width
            passed = int((~keeps[index] & real).sum())
        else:
            valid, dropped, passed = real.reshape(-1), torch.zeros_like(indices, dtype=torch.bool), 0
        runs = ~dropped[valid]
        picked = indices[valid][runs]
        assigned += torch.bincount(picked, minlength=experts).float()
        probability += torch.softmax(logits[valid].float(), -1).sum(0)
        rows += int(valid.sum())
        row = {"tokens": int(valid.sum()), "expert_tokens": torch.bincount(picked, minlength=experts).tolist()}
        if index in keeps:
            row["noop_slots"] = int((~runs).sum()) + top_k * passed
            row["noop_fraction"] = row["noop_slots"] / (top_k * (row["tokens"] + passed))
        stats.append(row)
    hand = experts * float((assigned / rows * probability / rows).sum())
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(hand, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    got = modadapt.expert_stats(model)
    assert [{k: r[k] for k in s} for r, s in zip(got, stats)] == stats
    assert all(r["tokens"] <= int(real.sum()) for r in got)  # padding never counted
    noop = [r for r in got if "noop_slots" in r]
    assert len(noop) == 3 and all(0 < r["noop_slots"] for r in noop) and any(p for p in _passed(model))

    assert out.router_aux_loss is not None and out.aux_loss is not None
    assert float(out.router_aux_loss.detach()) != 0.0  # the load loss acts once the cut-off is calibrated
    expected = lm_loss(out.logits, labels) + out.router_aux_loss + model.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    out.loss.backward()
    for layer in modadapt.mod_layers(model):  # the no-op row learns from the LM loss and its load loss
        grad = layer.router.scorer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for _, gate in expert_routers(model):  # and the experts' router still learns
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_slot_decisions_are_the_routers(tiny, ids):
    """What the experts' router drops is what the MoD router counted: the tokens that enter the
    MLP are those with a running slot, and the slots per token agree (`expert_slots`)."""
    model = _calibrate(_convert(tiny("mixtral")), ids)
    with watching_expert_routers(model, _slots) as calls, torch.no_grad():
        model(ids(1, 16, seed=3))
    for layer, (_, _, _, dropped) in zip(modadapt.mod_layers(model), calls[1:]):
        state = layer.mod_state
        assert state.last_slots is not None
        assert torch.equal(state.last_slots[state.last_keep], (~dropped).sum(-1))
        assert (state.last_slots[state.last_keep] > 0).all() and (state.last_slots[~state.last_keep] == 0).all()


def test_generate_and_cached_decode_equal_a_full_forward(tiny, ids, left_pad):
    """After calibration (routing that drops slots and tokens): greedy generation with left
    padding picks the argmax of a full forward at every step, cached decoding equals a full
    forward, and a padded row equals the row alone."""
    model = _calibrate(_convert(tiny("mixtral")), ids)
    prompts = [ids(1, n, seed=n)[0] for n in (5, 11, 8)]
    x, mask, _ = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        for row, prompt in enumerate(prompts):
            sequence = out.sequences[row, x.shape[1] - len(prompt) :][None]
            full = model(sequence).logits[0]
            for step, logits in enumerate(out.logits):
                torch.testing.assert_close(logits[row], full[len(prompt) - 1 + step], rtol=0, atol=1e-5)
            assert torch.equal(out.sequences[row, x.shape[1] :], full[len(prompt) - 1 : -1].argmax(-1))
        assert 0 < _noop_fraction(model) < 1 and sum(_passed(model)) > 0


def test_save_load_and_unload(tiny, ids, tmp_path):
    """A calibrated model saved and loaded routes and predicts the same (the no-op rows and the
    cut-offs are in the state dict); unload gives back the original state dict and classes."""
    dense = tiny("mixtral")
    original = {k: v.clone() for k, v in dense.state_dict().items()}
    classes = [type(m) for m in dense.modules()]
    model = _calibrate(_convert(tiny("mixtral")), ids)
    x = ids(2, 12, seed=5)
    with torch.no_grad():
        expected = model(x).logits
    stats = modadapt.expert_stats(model)
    assert any(r.get("noop_slots") for r in stats)
    modadapt.save(model, tmp_path / "saved")
    loaded = modadapt.load(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "modadapt.json").read_text())["mod_config"]["scope"] == "mlp"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    assert modadapt.expert_stats(loaded) == stats
    new_keys = set(model.state_dict()) - set(original)
    assert new_keys and all(".mlp.router." in key for key in new_keys)

    modadapt.unload(model)
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense(x).logits)


def test_dense_context_runs_the_original_experts_router(tiny, ids):
    model = _calibrate(_convert(tiny("mixtral")), ids)
    dense = tiny("mixtral")
    x = ids(2, 12, seed=5)
    with torch.no_grad(), modadapt.dense(model):
        assert torch.equal(model(x).logits, dense(x).logits)


def test_flops_count_the_slots_that_ran(tiny, ids):
    """The FLOPs model charges one expert per running slot; lm-adapt's evaluation reports it."""
    from modadapt.metrics.flops import flops_table, sequence_flops
    from modadapt.recipes.lm_adapt import evaluate

    model = _calibrate(_convert(tiny("mixtral")), ids)
    config = model.config
    D, I, T = config.hidden_size, config.intermediate_size, 16
    table = flops_table(model)
    assert all(row["expert"] == 3 * D * I and row["top_k"] == 2 for row in table["layers"])
    dense = sequence_flops(table, T)
    kept, slots = 10, 13
    mlp = table["layers"][1]["weights"] - table["layers"][1]["attention"]
    expected = dense - 2 * T * mlp + 2 * kept * mlp - 2 * (2 * kept - slots) * 3 * D * I + 2 * T * D
    assert sequence_flops(table, T, {1: (kept, slots)}) == expected
    assert sequence_flops(table, T, {1: (kept, 2 * kept)}) == sequence_flops(table, T, {1: kept})

    blocks = ids(4, T, seed=11)
    result = evaluate(model, blocks, batch_size=4)
    per_row = []
    for row in range(4):
        counts = {
            layer.mod_state.index: (
                int(layer.mod_state.last_keep[row].sum()),
                int(layer.mod_state.last_slots[row].sum()),
            )
            for layer in modadapt.mod_layers(model)
        }
        per_row.append(sequence_flops(table, T, counts))
    gate = 2 * 4 * T * config.num_local_experts * D * 3  # the experts' router scored every token, per MoD layer
    assert result["flops_ratio"] == pytest.approx((sum(per_row) + gate) / (4 * dense))
    assert result["flops_ratio"] < 0.9


def test_fixed_threshold_is_a_threshold_router_steered_by_its_load_loss(tiny, ids):
    """`threshold=0`: the no-op logit decides from the start, and the load loss pulls its share
    toward 1 - capacity: its gradient lowers the no-op logit while too many slots go to it."""
    model = _convert(tiny("mixtral"), capacity=0.9, router_kwargs={"threshold": 0.0, "alpha": 1.0}, scale=0.0)
    with torch.no_grad():
        model.eval()(ids(2, 12))
    share = _noop_fraction(model)
    assert share > 0.1  # a fresh no-op logit is 0: every slot whose expert's logit is negative
    model.train()
    x = ids(2, 12)
    out = model(x, labels=x)
    out.router_aux_loss.backward()
    for layer in modadapt.mod_layers(model):
        assert float(layer.router.scorer.bias.grad) > 0  # descent lowers the no-op logit


def test_bad_input_is_one_clear_error(tiny, ids, tmp_path, capsys):
    llama = tiny("llama")
    snapshot = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(modadapt.ModAdaptError, match="no mixture-of-experts layer"):
        modadapt.convert(llama, router="noop-expert")
    assert state_of(llama) is None and all(torch.equal(v, snapshot[k]) for k, v in llama.state_dict().items())
    with pytest.raises(modadapt.ModAdaptError, match="routes scope 'mlp' only"):
        modadapt.convert(tiny("mixtral"), router="noop-expert", scope="attention")
    with pytest.raises(modadapt.ModAdaptError, match="threshold"):
        modadapt.convert(tiny("mixtral"), router="noop-expert", router_kwargs={"threshold": "high"})

    # a Qwen2-MoE whose layer 1 has a dense MLP: that layer cannot take a no-op expert
    sparse = modadapt.build_preset("tiny-qwen2-moe")
    config = sparse.config
    config.mlp_only_layers = [1]
    import transformers

    partly = transformers.Qwen2MoeForCausalLM(config)
    with pytest.raises(modadapt.ModAdaptError, match="layer 1's MLP is not a mixture of experts"):
        modadapt.convert(partly, router="noop-expert", layers=[1, 2])
    assert state_of(partly) is None
    modadapt.convert(partly, router="noop-expert", layers=[2, 3])

    assert main(["convert", "tiny-llama", "--router", "noop-expert", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no mixture-of-experts layer" in err[0] and not (tmp_path / "a").exists()
    assert (
        main(["convert", "tiny-mixtral", "--router", "noop-expert", "--capacity", "0.5", "-o", str(tmp_path / "b")])
        == 0
    )
    assert "noop-expert" in capsys.readouterr().out
    loaded = modadapt.load(tmp_path / "b")
    assert state_of(loaded).config.scope == "mlp" and state_of(loaded).config.capacity == 0.5


def test_listed_with_its_options(capsys):
    assert main(["list", "routers"]) == 0
    out = capsys.readouterr().out
    assert "noop-expert" in out and "threshold" in out and "alpha" in out


class TestFixedThresholdConformance(AdapterConformance):
    """The shipped kits with a fixed cut-off, so that even a model that never trained routes:
    decoding, padding, persistence and gradients with slots and tokens dropped."""

    router_name = "noop-expert"
    router_kwargs = {"threshold": 0.0}
    preset = "tiny-mixtral"

    def test_full_capacity_equals_dense(self):
        pytest.skip("a fixed cut-off drops slots at any capacity (the capacity is its load loss's target)")
