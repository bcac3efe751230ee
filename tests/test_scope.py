"""Sublayer routing (`ModConfig.scope`): a MoD layer routes its attention only or its MLP only.

With 'attention' a skipped token skips attention and writes no K/V there, and still goes through
the MLP; with 'mlp' every token goes through attention and writes K/V, and a skipped token skips
the MLP. The same invariants as whole blocks: the shipped conformance kit for every router (and
every family the adapter can split), then decoding, padding, beams, sampling, persistence,
training and the FLOPs model here.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import beam_search_scored, sampled_rows_match_recompute
from transformers import DynamicCache

import modadapt
from modadapt.adapters.hf.presets import DECODER_FAMILIES
from modadapt.adapters.hf.versions import cache_argument
from modadapt.errors import ModAdaptError
from modadapt.plugins import registry
from modadapt.testing import AdapterConformance

pytestmark = pytest.mark.usefixtures("one_thread")

SCOPES = ("attention", "mlp")
#: Every decoder family splits: pre-norm layers add a sublayer's output to the residual as it is;
#: post-norm ones (Gemma 2/3, OLMo 2) normalise it first, and the gate scales the norm's output.
SPLIT = list(DECODER_FAMILIES)
POST_NORM = ("gemma2", "gemma3", "olmo2")
ROUTERS = [router.name for router in registry().list("router")]
#: The expensive invariants run on these: rotary and learned positions, a mixture of experts,
#: post-norm layers with sliding and global attention.
CORE = ["llama", "gpt2", "mixtral", "gemma3"]
CASES = [(scope, router, "tiny-llama") for scope in SCOPES for router in ROUTERS] + [
    (scope, "random", f"tiny-{family}") for scope in SCOPES for family in SPLIT if family != "llama"
]


class TestSublayerConformance(AdapterConformance):
    @pytest.fixture(autouse=True, params=CASES, ids=[f"{s}-{r}-on-{p}" for s, r, p in CASES])
    def _case(self, request):
        self.scope, self.router_name, self.preset = request.param


def _convert(model, randomize, scope, router="threshold-p", **config):
    modadapt.convert(model, router=router, scope=scope, **config)
    if router != "random":
        randomize(model)
    return model


def _generate(model, x, mask, steps=6, **kwargs):
    with torch.no_grad():
        return model.generate(x, attention_mask=mask, max_new_tokens=steps, do_sample=False, **kwargs)


@pytest.mark.parametrize("family_", CORE)
@pytest.mark.parametrize("scope", SCOPES)
def test_skipped_tokens_write_kv_only_with_mlp_scope(scope, family_, tiny, ids, randomize_routers):
    """'attention': a MoD layer's cache holds its kept tokens only; 'mlp': every token (the
    attention is dense). The routed sublayer adds exactly nothing for a skipped token."""
    model = _convert(tiny(family_), randomize_routers, scope)
    outputs = {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, out, _i=layer.mod_state.index: outputs.__setitem__(
                _i, out[0] if isinstance(out, tuple) else out
            )
        )
        for layer in modadapt.mod_layers(model)
    ]
    x = ids(2, 12)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(x, **{cache_argument(model.forward): cache}, use_cache=True)  # `cache` from transformers 5.24
    for handle in handles:
        handle.remove()
    for layer in modadapt.mod_layers(model):
        index, keep = layer.mod_state.index, layer.mod_state.last_keep
        assert keep.any() and (~keep).any()
        assert torch.equal(outputs[index][~keep], torch.zeros_like(outputs[index][~keep]))
        held = cache.layers[index]
        window = held.sliding_window if getattr(held, "is_sliding", False) else None
        if scope == "mlp":
            assert held.keys.shape[-2] == (12 if window is None else min(12, window - 1))
        elif window is None:
            assert held.keys.shape[-2] == int(keep.sum(1).max()) < 12


@pytest.mark.parametrize("family_", CORE)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("router", ["threshold-p", "random"])
def test_left_padded_generation_equals_recompute_and_each_prompt_alone(
    scope, router, family_, tiny, ids, left_pad, randomize_routers
):
    model = _convert(tiny(family_), randomize_routers, scope, router=router, capacity=0.5)
    prompts = [ids(1, n, seed=n)[0] for n in (5, 11, 8)]
    x, mask, pos = left_pad(prompts)
    width, steps = x.shape[1], 6
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones(3, steps, dtype=mask.dtype)], 1)
        full = model(
            out.sequences, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
        keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits, full[:, width - 1 + step], rtol=0, atol=1e-5)
        real = full_mask.bool()
        assert all(not k[~real].any() for k in keeps)  # padding is never kept
        assert any(k[real].any() and not k[real].all() for k in keeps)
        for row, prompt in enumerate(prompts):
            alone = _generate(model, prompt[None], None, steps)
            assert torch.equal(out.sequences[row, width:], alone[0, len(prompt) :])


@pytest.mark.parametrize("scope", SCOPES)
def test_beam_search_and_sampling_match_recompute(scope, tiny, ids, left_pad, randomize_routers):
    model = _convert(tiny("llama"), randomize_routers, scope)
    beam_search_scored(model, ids(2, 7), 5)
    x, mask, _ = left_pad([ids(1, n, seed=n)[0] for n in (5, 8)])
    sampled_rows_match_recompute(model, x, mask, 5, seed=3)


@pytest.mark.parametrize("scope", SCOPES)
def test_save_load_unload_and_the_cli(scope, tiny, ids, randomize_routers, tmp_path):
    from modadapt.cli import main

    model = _convert(tiny("llama"), randomize_routers, scope, layers="all-but-first")
    x = ids(2, 10)
    with torch.no_grad():
        expected = model(x).logits
    modadapt.save(model, tmp_path / "saved")
    loaded = modadapt.load(tmp_path / "saved")
    assert modadapt.mod_layer.state_of(loaded).config.scope == scope
    sublayer = "self_attn" if scope == "attention" else "mlp"
    assert all(f".{sublayer}.router." in name for name, _ in loaded.named_parameters() if ".router." in name)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    dense = tiny("llama")
    modadapt.unload(loaded)
    assert loaded.state_dict().keys() == dense.state_dict().keys()
    assert [type(m) for m in loaded.modules()] == [type(m) for m in dense.modules()]
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in loaded.modules()] == [
        (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in dense.modules()
    ]

    assert main(["convert", "tiny-llama", "--scope", scope, "-o", str(tmp_path / "cli")]) == 0
    assert modadapt.mod_layer.state_of(modadapt.load(tmp_path / "cli")).config.scope == scope
    assert main(["convert", "tiny-vit", "--scope", scope, "-o", str(tmp_path / "vit")]) == 2  # timm: one line
    assert not (tmp_path / "vit").exists()


@pytest.mark.parametrize("scope", SCOPES)
def test_training_with_trainer_and_checkpointing(scope, tiny, ids, randomize_routers, tmp_path):
    model = _convert(tiny("llama"), randomize_routers, scope, router="topk", capacity=0.5)
    model.train()
    x = ids(2, 12)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x, labels=x)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    assert all(grads[n].abs().sum() > 0 for n in grads if ".router." in n) and any(".router." in n for n in grads)
    model.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = step()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)
    model.gradient_checkpointing_disable()
    data = [{"input_ids": row, "labels": row.clone()} for row in ids(8, 16, seed=5)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    assert transformers.Trainer(model=model, args=args, train_dataset=data).train().global_step == 2
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before[n]) for n in before)


def test_mlp_scope_experts_see_exactly_the_kept_tokens(tiny, ids, left_pad, randomize_routers):
    """Routing a mixture-of-experts MLP: its router runs on the kept real tokens only (packed:
    no filler slot reaches the experts), and the load counts them; every token writes K/V."""
    model = _convert(tiny("mixtral"), randomize_routers, "mlp")
    seen = []
    handles = [
        m.register_forward_hook(lambda mod, a, out: seen.append(out[0].shape[0]))
        for m in model.modules()
        if type(m).__name__ == "MixtralTopKRouter"
    ]
    x, mask, pos = left_pad([ids(1, n, seed=n)[0] for n in (5, 12, 8)])
    with torch.no_grad():
        out = model(x, attention_mask=mask, position_ids=pos)
    for handle in handles:
        handle.remove()
    real = mask.bool()
    kept = [int((layer.mod_state.last_keep & real).sum()) for layer in modadapt.mod_layers(model)]
    assert seen == [x.numel(), kept[0], x.numel(), kept[1]] and 0 < min(kept) and max(kept) < int(real.sum())
    stats = modadapt.expert_stats(model)
    assert [row["tokens"] for row in stats] == [int(real.sum()), kept[0], int(real.sum()), kept[1]]
    assert out.aux_loss is not None


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("post_norm", POST_NORM)
def test_post_norm_sublayers_scale_the_normed_output_by_the_gate(post_norm, scope, tiny, ids, randomize_routers):
    """A post-norm layer adds `norm(f(x))` to the residual; the routed sublayer's gate scales
    that (inside the norm it would cancel): at capacity 1 with p-MoD's tanh gate the model equals
    the dense one whose post-sublayer norm output is scaled by `1 + 0.2 tanh(score)`, and the
    router learns from the LM loss alone."""
    model = modadapt.convert(
        tiny(post_norm), router="topk", capacity=1.0, scope=scope, router_kwargs={"gate": "tanh", "aux_coef": 0.0}
    )
    randomize_routers(model)
    dense = tiny(post_norm)
    _, stack = modadapt.plugins.find_adapter(dense).layer_stack(dense)
    inputs, handles = {}, []
    for layer in modadapt.mod_layers(model):
        i, scorer = layer.mod_state.index, layer.router.scorer
        sublayer = stack[i].self_attn if scope == "attention" else stack[i].mlp
        norm = stack[i].post_attention_layernorm if scope == "attention" else stack[i].post_feedforward_layernorm
        handles.append(
            sublayer.register_forward_pre_hook(
                lambda m, args, kwargs, _i=i: inputs.__setitem__(
                    _i, kwargs.get("hidden_states", args[0] if args else None)
                ),
                with_kwargs=True,
            )
        )
        handles.append(
            norm.register_forward_hook(
                lambda m, args, out, _i=i, _s=scorer: out * (1 + 0.2 * torch.tanh(_s(inputs[_i]))).unsqueeze(-1)
            )
        )
    x = ids(2, 12)
    with torch.no_grad():
        expected = dense(x).logits
        got = model(x).logits
        plain = modadapt.build_preset(f"tiny-{post_norm}")(x).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the gates matter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()
    model.train()
    model(x, labels=x).loss.backward()
    for layer in modadapt.mod_layers(model):
        assert layer.router.scorer.weight.grad.abs().sum() > 1e-3


def test_sublayer_refusals(tiny):
    with pytest.raises(ModAdaptError, match="scope must be one of block, attention, mlp"):
        modadapt.ModConfig(scope="heads")
    with pytest.raises(ModAdaptError, match="cannot route a layer's sublayers"):
        modadapt.convert(modadapt.build_preset("tiny-vit"), router="topk", scope="attention")
    with pytest.raises(ModAdaptError, match="whole blocks.*model.generate"):
        modadapt.GraphedDecoder(modadapt.convert(tiny("llama"), router="threshold-p", scope="attention"))


@pytest.mark.parametrize("scope", ["block", *SCOPES])
def test_flops_count_the_routed_sublayer_on_the_kept_tokens(scope, tiny):
    from modadapt.metrics.flops import flops_table, sequence_flops

    model = modadapt.convert(tiny("llama"), router="topk", scope=scope, layers=[1])
    table = flops_table(model)
    row = table["layers"][1]
    D, I, T, n = 64, 128, 16, 5
    A, M = 2 * D * D + 2 * D * 32, 3 * D * I  # q, o and GQA k, v; gate, up, down
    assert (row["attention"], row["weights"], row["scope"], row["router"]) == (A, A + M, scope, D)
    attention = {"kept": 2 * n * A + 4 * n * n * D, "all": 2 * T * A + 4 * T * T * D}
    mlp = {"kept": 2 * n * M, "all": 2 * T * M}
    expected = {
        "block": attention["kept"] + mlp["kept"],
        "attention": attention["kept"] + mlp["all"],
        "mlp": attention["all"] + mlp["kept"],
    }[scope]
    dense = sequence_flops(table, T)
    assert sequence_flops(table, T, {1: n}) == dense - attention["all"] - mlp["all"] + expected + 2 * T * D
