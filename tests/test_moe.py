"""Staged MoDE: mixture-of-experts blocks inside MoD layers (Mixtral, Qwen2-MoE, Qwen3-MoE).

The MoD router decides which tokens enter a layer; the experts' router then sees only those. Its
load-balancing loss and the expert counts must count kept real tokens only: never padding, never a
token the MoD layer skipped, never a filler slot of a row that kept fewer than the widest. Checked
against a reference computed by hand from the router calls, which are watched here by hooks of the
test's own.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MOE_FAMILIES, expert_routers, lm_loss, watching_expert_routers

import modadapt

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(out):
    """What these tests watch of an experts' router call: its logits `[N, E]`."""
    return (out[0].detach(),)


def _hand_reference(rows_per_layer: list[torch.Tensor], experts: int, top_k: int):
    """The Switch load-balancing loss over the given router rows (all layers together), and each
    layer's expert counts, token by token in Python."""
    assigned, probability, n = [0.0] * experts, [0.0] * experts, 0
    counts = []
    for rows in rows_per_layer:
        layer_counts = [0] * experts
        for row in rows.double().tolist():
            top = max(row)
            p = [math.exp(v - top) for v in row]
            total = sum(p)
            p = [v / total for v in p]
            for e in sorted(range(experts), key=lambda e: -p[e])[:top_k]:
                assigned[e] += 1
                layer_counts[e] += 1
            for e in range(experts):
                probability[e] += p[e]
            n += 1
        counts.append(layer_counts)
    loss = experts * sum(assigned[e] / n * probability[e] / n for e in range(experts))
    return loss, counts


def _padded_batch(left_pad, ids):
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (5, 12, 8)])
    labels = x.masked_fill(mask == 0, -100)
    return x, mask, pos, labels


@pytest.mark.parametrize("moe_family", MOE_FAMILIES)
def test_expert_loss_and_counts_count_kept_real_tokens_only(moe_family, tiny, ids, left_pad, randomize_routers):
    """Training with padding: top-k keeps ceil(c * n) per row, so rows keep different counts and the
    shorter rows hold filler slots. The experts' loss and counts are those of the real kept rows,
    and `loss` is the LM loss plus both auxiliary losses, each reported apart."""
    model = modadapt.convert(tiny(moe_family), router="topk", capacity=0.5)
    randomize_routers(model)
    model.train()
    x, mask, pos, labels = _padded_batch(left_pad, ids)
    real = mask.bool()
    with watching_expert_routers(model, _logits) as calls:
        out = model(x, attention_mask=mask, position_ids=pos, labels=labels)

    mod = {layer.mod_state.index: layer.mod_state.last_keep for layer in modadapt.mod_layers(model)}
    rows, layers = [], []
    for index, logits in calls:
        if index in mod:  # the slots the MoD layer ran: each row's kept tokens, then filler slots
            counts = (mod[index] & real).sum(1)
            width = int(counts.max())
            assert logits.shape[0] == 3 * width and int(counts.sum()) < 3 * width  # filler slots were there
            assert int(counts.sum()) < int(real.sum())  # and skipped tokens
            valid = (torch.arange(width)[None] < counts[:, None]).reshape(-1)
        else:  # a dense layer: every token of the batch, padding included
            assert logits.shape[0] == x.numel()
            valid = real.reshape(-1)
        rows.append(logits[valid])
        layers.append(index)
    assert sorted(mod) == [1, 3] and layers == [0, 1, 2, 3]
    config = model.config
    loss, counts = _hand_reference(rows, 4, 2)
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(loss, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    stats = modadapt.expert_stats(model)
    assert [row["layer"] for row in stats] == [0, 1, 2, 3] and [row["mod"] for row in stats] == [
        False,
        True,
        False,
        True,
    ]
    assert [row["tokens"] for row in stats] == [len(r) for r in rows]
    assert [row["expert_tokens"] for row in stats] == counts
    assert all(sum(row["expert_tokens"]) == 2 * row["tokens"] for row in stats)

    assert out.router_aux_loss is not None and out.aux_loss is not None  # both reported, apart
    expected = lm_loss(out.logits, labels) + out.router_aux_loss + config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    assert [r.shape[0] for r in out.router_logits] == [c[1].shape[0] for c in calls]
    out.loss.backward()
    for _, router in expert_routers(model):  # the experts' routers learn from the load-balancing loss
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert modadapt.expert_stats(model) == stats  # backward records nothing


@pytest.mark.parametrize("moe_family", MOE_FAMILIES)
def test_full_capacity_expert_loss_equals_transformers(moe_family, tiny, ids, left_pad):
    """At capacity 1 every real token enters every layer: the loss is transformers' own (which
    masks padding with the attention mask), and so is `loss`."""
    model = tiny(moe_family)
    x, mask, pos, labels = _padded_batch(left_pad, ids)
    with torch.no_grad():
        dense = model(x, attention_mask=mask, position_ids=pos, labels=labels)
        modadapt.convert(model, router="topk", capacity=1.0)
        routed = model(x, attention_mask=mask, position_ids=pos, labels=labels)
    assert routed.aux_loss is not None and not torch.equal(routed.aux_loss, torch.zeros(()))
    torch.testing.assert_close(routed.aux_loss, dense.aux_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(routed.loss, dense.loss, rtol=1e-6, atol=1e-6)
    modadapt.unload(model)  # transformers computes it again
    with torch.no_grad():
        again = model(x, attention_mask=mask, position_ids=pos, labels=labels)
    torch.testing.assert_close(again.aux_loss, dense.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("packing", ["packed", "packed-bucket"])
def test_packed_layers_count_what_padded_layers_count(packing, tiny, ids, left_pad, randomize_routers):
    """A packed MoD layer runs the rows' kept tokens as one sequence (no filler slot; with
    `pack_bucket`, filler tokens in a segment of their own): the same loss and counts."""
    extra = dict(pack_bucket=16) if packing == "packed-bucket" else {}
    results = []
    for mode in ("padded", "packed"):
        model = modadapt.convert(
            tiny("mixtral"), router="threshold-p", packing=mode, **(extra if mode == "packed" else {})
        )
        randomize_routers(model)
        x, mask, pos, labels = _padded_batch(left_pad, ids)
        with watching_expert_routers(model, _logits) as calls, torch.no_grad():
            out = model(x, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False)
        results.append((out.aux_loss, modadapt.expert_stats(model), [c[1].shape[0] for c in calls]))
    (padded_aux, padded_stats, padded_rows), (packed_aux, packed_stats, packed_rows) = results
    assert packed_rows[1] < padded_rows[1] or packing == "packed-bucket"  # no filler slot when packed
    if packing == "packed-bucket":
        assert packed_rows[1] % 16 == 0 and packed_rows[1] > packed_stats[1]["tokens"]  # bucket fillers ran
    torch.testing.assert_close(packed_aux, padded_aux, rtol=1e-5, atol=1e-6)
    assert packed_stats == padded_stats


def test_router_logits_off_means_no_expert_loss(tiny, ids, randomize_routers):
    model = modadapt.convert(tiny("qwen2-moe"), router="topk", capacity=0.5)
    randomize_routers(model)
    model.train()
    x = ids(2, 12)
    out = model(x, labels=x, output_router_logits=False)
    assert out.get("aux_loss") is None
    torch.testing.assert_close(out.loss, lm_loss(out.logits, x) + out.router_aux_loss, rtol=0, atol=1e-5)
    assert [row["tokens"] for row in modadapt.expert_stats(model)] == [24, 12, 24, 12]  # still counted


def test_expert_stats_need_a_converted_model_and_are_empty_without_experts(tiny, ids):
    with pytest.raises(modadapt.ModAdaptError, match="not converted"):
        modadapt.expert_stats(tiny("mixtral"))
    model = modadapt.convert(tiny("llama"), router="topk")
    with torch.no_grad():
        model(ids(1, 8))
    assert modadapt.expert_stats(model) == []


def test_gradient_checkpointing_records_each_router_call_once(tiny, ids, randomize_routers):
    model = modadapt.convert(tiny("mixtral"), router="threshold-p", router_kwargs={"alpha": 0.1})
    randomize_routers(model)
    model.train()
    x = ids(2, 12)
    loss = model(x, labels=x).loss
    stats, aux = modadapt.expert_stats(model), model(x, labels=x).aux_loss.detach()
    model.gradient_checkpointing_enable()
    out = model(x, labels=x)
    before = modadapt.expert_stats(model)
    out.loss.backward()  # recomputes every layer
    assert modadapt.expert_stats(model) == before == stats
    torch.testing.assert_close(out.aux_loss.detach(), aux, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("moe_family", MOE_FAMILIES)
def test_flops_count_the_router_and_the_top_k_experts(moe_family, tiny):
    from modadapt.metrics.flops import flops_table

    model = tiny(moe_family)
    config = model.config
    D, kv = config.hidden_size, config.num_key_value_heads * (getattr(config, "head_dim", None) or 16)
    I = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    attention = D * D + 2 * D * kv + D * D
    mlp = 4 * D + 2 * 3 * D * I  # the experts' router, then 2 of 4 experts (gate, up, down)
    if hasattr(config, "shared_expert_intermediate_size"):
        mlp += 3 * D * config.shared_expert_intermediate_size + D  # Qwen2-MoE: a shared expert and its gate
    converted = modadapt.convert(tiny(moe_family), router="topk")
    for table in (flops_table(model), flops_table(converted)):
        assert all(row["attention"] == attention and row["weights"] == attention + mlp for row in table["layers"])
