"""ARank and the cosine metric: exact ranks of constructed maps, padding-awareness, the drivers on
real model code (probe path, eager fallback, BERT, timm), selection rules and the FLOPs formula."""

import pytest
import torch

import modadapt
from modadapt.errors import ModAdaptError
from modadapt.metrics import arank as arank_module
from modadapt.metrics.arank import attention_rank, layer_aranks
from modadapt.metrics.cosine import layer_cosines
from modadapt.metrics.flops import layer_flops, linear_weights
from modadapt.metrics.selection import parse_rule, select_layers

T = 12


def maps(*rows: torch.Tensor) -> torch.Tensor:
    """[B=1, H, T, T] from per-head [T, T] maps."""
    return torch.stack(rows)[None]


def uniform_blocks(sizes):
    m = torch.block_diag(*[torch.full((s, s), 1.0 / s) for s in sizes])
    return m


def first_of_block(sizes):
    """Causal map: every token attends to the first token of its block (the first attends itself)."""
    m = torch.zeros(sum(sizes), sum(sizes))
    start = 0
    for s in sizes:
        m[start : start + s, start] = 1.0
        start += s
    return m


def test_bidirectional_ranks_are_exact():
    assert attention_rank(maps(torch.eye(T)), causal=False).item() == T
    assert attention_rank(maps(torch.full((T, T), 1.0 / T)), causal=False).item() == 1
    assert attention_rank(maps(uniform_blocks([3, 4, 5])), causal=False).item() == 3
    # heads are averaged: rank 1 and rank T
    assert attention_rank(maps(torch.full((T, T), 1.0 / T), torch.eye(T)), causal=False).item() == (1 + T) / 2


def test_causal_ranks_mask_the_upper_triangle_and_zero_the_diagonal():
    previous = torch.diag(torch.ones(T - 1), -1)
    previous[0, 0] = 1.0  # attend to the previous token; the first token to itself
    assert attention_rank(maps(previous), causal=True).item() == T - 1
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0  # everything attends to token 0
    assert attention_rank(maps(sink), causal=True).item() == 1
    assert attention_rank(maps(first_of_block([4, 4, 4])), causal=True).item() == 3
    # the diagonal alone would be full rank; γ-MoD zeroes it
    assert attention_rank(maps(torch.eye(T)), causal=True).item() == 0
    assert attention_rank(maps(torch.eye(T)), causal=False).item() == T
    # anything above the diagonal is masked
    assert attention_rank(maps(torch.triu(torch.ones(T, T))), causal=True).item() == 0


def pad(m: torch.Tensor, size: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed an [H, n, n] map at offset `left` of a [H, size, size] map whose padded rows and
    columns hold junk; returns it with its padding mask."""
    h, n, _ = m.shape
    out = torch.rand(h, size, size)
    out[:, left : left + n, left : left + n] = m
    mask = torch.zeros(size, dtype=torch.bool)
    mask[left : left + n] = True
    return out, mask


@pytest.mark.parametrize("causal", [False, True])
def test_padding_does_not_change_the_rank(causal):
    generator = torch.Generator().manual_seed(0)
    samples = [
        torch.softmax(torch.randn(2, 7, 7, generator=generator), -1),
        torch.stack([first_of_block([3, 3, 4]), uniform_blocks([5, 5])]),
        torch.stack([torch.eye(9), torch.full((9, 9), 1 / 9)]),
    ]
    alone = torch.cat([attention_rank(s[None], causal=causal) for s in samples])
    padded = [pad(s, 14, left) for s, left in zip(samples, (0, 4, 5))]  # right, left and both
    batch = torch.stack([p[0] for p in padded])
    mask = torch.stack([p[1] for p in padded])
    assert torch.equal(attention_rank(batch, causal=causal, padding_mask=mask), alone)
    assert not torch.equal(attention_rank(batch, causal=causal), alone)  # the junk would count


def test_tolerance_and_bad_shapes():
    noisy = torch.full((T, T), 1.0 / T) + 1e-4 * torch.eye(T)
    assert attention_rank(maps(noisy), causal=False).item() == T
    assert attention_rank(maps(noisy), causal=False, tol=1e-3).item() == 1
    with pytest.raises(ModAdaptError, match="B, H, T, T"):
        attention_rank(torch.ones(2, 3, 4), causal=False)


def llama_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_driver_probe_equals_eager_fallback_and_restores_the_kernel(monkeypatch):
    model = modadapt.build_preset("tiny-llama")
    ids, mask = llama_batch()
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    probed = layer_aranks(model, batches)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(arank_module, "_try_probe", lambda model, n: None)
    eager = layer_aranks(model, batches)
    assert model.config._attn_implementation == "sdpa"
    assert len(probed) == 4 and all(r["samples"] == 3 for r in probed)
    for a, b in zip(probed, eager):
        assert a["mean"] == pytest.approx(b["mean"]) and a["std"] == pytest.approx(b["std"])
    # the driver removed padding: each sample alone (no padding) gives the same ranks
    alone = [layer_aranks(model, [{"input_ids": ids[i : i + 1, : int(mask[i].sum())]}]) for i in range(3)]
    for layer in range(4):
        expected = torch.tensor([alone[i][layer]["mean"] for i in range(3)])
        assert probed[layer]["mean"] == pytest.approx(expected.mean().item())
        lengths = mask.sum(1).float()
        assert probed[layer]["normalized_mean"] == pytest.approx((expected / lengths).mean().item())


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BertModel(config).eval()


def test_bert_fallback_matches_output_attentions():
    model = tiny_bert()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    rows = layer_aranks(model, [{"input_ids": ids, "attention_mask": mask}])
    assert model.config._attn_implementation == "sdpa"  # eager only during the probe
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for row, attn in zip(rows, attentions):
        ranks = attention_rank(attn, causal=False, padding_mask=mask)
        assert row["mean"] == pytest.approx(ranks.mean().item())
        assert ranks[1] <= 6


def test_timm_vit_probe_equals_unfused_fallback(monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=10
    )
    fused = [block.attn.fused_attn for block in model.blocks]
    images = [torch.randn(2, 3, 32, 32)]
    rows = layer_aranks(model, images)  # through the timm adapter's probe when it is installed
    monkeypatch.setattr(arank_module, "_try_probe", lambda model, n: None)
    assert [r["mean"] for r in layer_aranks(model, images)] == [r["mean"] for r in rows]
    assert [block.attn.fused_attn for block in model.blocks] == fused
    assert len(rows) == 3
    tokens = 1 + (32 // 8) ** 2
    assert all(0 < r["mean"] <= tokens and r["normalized_mean"] == pytest.approx(r["mean"] / tokens) for r in rows)


def test_cosine_matches_hidden_states_and_ignores_padding():
    model = modadapt.build_preset("tiny-llama")
    ids, mask = llama_batch()
    rows = layer_cosines(model, [{"input_ids": ids, "attention_mask": mask}])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for i in range(3):  # the last entry of hidden_states has the final norm applied
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        per_sample = torch.stack([cos[b][real[b]].mean() for b in range(3)])
        assert rows[i]["mean"] == pytest.approx(per_sample.mean().item(), abs=1e-5)
        assert rows[i]["normalized_mean"] is None


def test_selection_rules():
    scores = [1.0, 5.0, 2.0, 4.0, 3.0, 0.5]
    assert select_layers(scores, parse_rule("count=2"), lower_is_redundant=True) == [2, 5]
    assert select_layers(scores, parse_rule("fraction=0.5"), lower_is_redundant=True) == [2, 4, 5]
    assert select_layers(scores, parse_rule("threshold=3.5"), lower_is_redundant=True) == [2, 4, 5]
    assert select_layers(scores, parse_rule("count=2"), lower_is_redundant=False) == [1, 3]  # cosine
    assert select_layers(scores, parse_rule("threshold=3.5"), lower_is_redundant=False) == [1, 3]
    assert 0 not in select_layers(scores, parse_rule("fraction=1"), lower_is_redundant=True)
    assert select_layers([1.0, 1.0, 1.0, 1.0], ("count", 1), lower_is_redundant=True) == [1]  # ties: earlier
    with pytest.raises(ModAdaptError, match="threshold"):
        select_layers(scores, ("threshold", 0.1), lower_is_redundant=True)
    with pytest.raises(ModAdaptError, match="more layers"):
        select_layers(scores, ("count", 6), lower_is_redundant=True)
    for bad in ("fraction=0", "fraction=1.5", "count=0", "count=1.5", "threshold=x", "top=3", "nan", "threshold=nan"):
        with pytest.raises(ModAdaptError):
            parse_rule(bad)


def test_flops_formula():
    model = modadapt.build_preset("tiny-llama")
    layer = model.model.layers[1]
    weights = linear_weights(layer)
    # q, k, v, o (GQA: k and v are half width) and gate, up, down
    assert weights == 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert layer_flops(weights, 64, 64, 10) == 2 * 10 * weights + 4 * 100 * 64
    assert layer_flops(weights, 64, 64, 10, capacity=0.25) == 2 * 3 * weights + 4 * 9 * 64 + 2 * 10 * 64
    assert layer_flops(weights, 64, 64, 10, capacity=1.0) == layer_flops(weights, 64, 64, 10) + 2 * 10 * 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_driver_on_gpu_matches_cpu():
    ids, mask = llama_batch()
    for model in (modadapt.build_preset("tiny-llama"), tiny_bert()):
        batches = [{"input_ids": ids % model.config.vocab_size, "attention_mask": mask}]
        cpu = layer_aranks(model, batches)
        gpu = layer_aranks(model.cuda(), batches)
        assert [r["mean"] for r in gpu] == pytest.approx([r["mean"] for r in cpu])
        assert [r["normalized_mean"] for r in gpu] == pytest.approx([r["normalized_mean"] for r in cpu])
