"""Routers fitted to their layers' update sizes (`router_init: update-size`) and the routers'
learning-rate scale."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import build_tiny, lm_adapt_config, make_ids

import modadapt
from modadapt.errors import ModAdaptError
from modadapt.recipes.lm_adapt import run
from modadapt.recipes.router_init import collect, fit_router_scores, ridge_fit

pytestmark = pytest.mark.usefixtures("one_thread")


def batches():
    ids = make_ids(4, 24)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: never a sample
    return [{"input_ids": ids, "attention_mask": mask}]


def test_fit_is_the_ridge_solution_over_real_tokens_only():
    model = modadapt.convert(build_tiny(), router="topk", capacity=0.5, layers=[1, 3])
    data = collect(model, batches())
    assert {i: x.shape[0] for i, (x, _) in data.items()} == {1: 4 * 24 - 6, 3: 4 * 24 - 6}
    fitted = fit_router_scores(model, batches())
    for layer in modadapt.mod_layers(model):
        x, y = data[layer.mod_state.index]
        # an independent solve of the same problem: centred ridge, then unit-variance scores
        xc = x - x.mean(0)
        gram = xc.T @ xc
        w = torch.linalg.solve(
            gram + 1e-3 * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - y.mean())
        )
        w = w / (xc @ w).std()
        scorer = layer.router.scorer
        assert torch.allclose(scorer.weight.double().flatten(), w, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            score = scorer(x.float()).double()
        assert abs(score.mean()) < 1e-3 and score.std() == pytest.approx(1.0, rel=1e-3)
        assert fitted[layer.mod_state.index] > 0.3  # in-sample: the score follows the target


def test_fitted_router_keeps_the_tokens_its_layer_moves_most():
    model = modadapt.convert(build_tiny(), router="topk", capacity=0.5, layers=[1, 3])
    fit_router_scores(model, batches())
    ids = batches()[0]["input_ids"][1:]
    sizes = {i: y for i, (_, y) in collect(model, [{"input_ids": ids}]).items()}  # dense, row by row
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    for layer in modadapt.mod_layers(model):
        keep = layer.mod_state.last_keep.bool().flatten()
        size = sizes[layer.mod_state.index]
        assert size[keep].mean() > size[~keep].mean()  # a sign error would skip the busiest tokens


def test_routers_without_a_linear_score_are_refused():
    model = modadapt.convert(build_tiny(), router="random", capacity=0.5, layers=[1, 3])
    with pytest.raises(ModAdaptError, match="linear score"):
        fit_router_scores(model, batches())


def test_ridge_fit_recovers_a_linear_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    y = x @ torch.arange(1.0, 9.0, dtype=torch.float64) + 3.0
    w, b = ridge_fit(x, y, ridge=1e-9)
    score = x @ w + b
    assert torch.corrcoef(torch.stack([score, y]))[0, 1] > 0.999999


config = functools.partial(lm_adapt_config, max_steps=1)  # one step: what the first update did


def scorer_weights(model):
    return [layer.router.scorer.weight.detach().clone() for layer in modadapt.mod_layers(model)]


def test_lm_adapt_starts_from_fitted_routers(tmp_path, capsys):
    fitted = build_tiny()
    run(config(tmp_path / "a", router_init="update-size", lr=1e-9), model=fitted)
    assert "router_init update-size" in capsys.readouterr().out
    zero = build_tiny()
    run(config(tmp_path / "b", lr=1e-9), model=zero)
    assert all(w.abs().max() > 1e-3 for w in scorer_weights(fitted))  # fitted, not moved by lr 1e-9
    assert all(w.abs().max() < 1e-6 for w in scorer_weights(zero))


def test_router_learning_rate_scale_moves_only_the_routers_faster(tmp_path):
    def one_step(lr, scale, where):
        model = build_tiny()
        run(config(tmp_path / where, lr=lr, router_lr_scale=scale, router_init="update-size"), model=model)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    start = one_step(1e-12, 1.0, "start")  # the fitted routers, unmoved
    base, fast = one_step(1e-3, 1.0, "base"), one_step(1e-3, 10.0, "fast")
    routers = [n for n in start if ".router." in n]
    assert routers
    for name in start:
        moved_base, moved_fast = base[name] - start[name], fast[name] - start[name]
        if name in routers:  # Adam's first step is proportional to the learning rate
            assert torch.allclose(moved_fast, 10 * moved_base, rtol=1e-2, atol=1e-6), name
        else:  # the first gradient is the same in both runs, and so is the update
            assert torch.equal(moved_fast, moved_base), name


def test_bad_router_options_are_one_clear_error(tmp_path):
    with pytest.raises(ModAdaptError, match="router_init must be one of zero, update-size"):
        config(tmp_path, router_init="ones")
    with pytest.raises(ModAdaptError, match="router_lr_scale must be > 0"):
        config(tmp_path, router_lr_scale=0)
    with pytest.raises(ModAdaptError, match="router_init_blocks"):
        config(tmp_path, router_init_blocks=0)


@pytest.mark.parametrize(("kind", "scope"), [("llama", "attention"), ("llama", "mlp"), ("olmo2", "attention")])
def test_a_routed_sublayer_is_fitted_to_what_it_adds_to_the_residual(kind, scope):
    """A sublayer returns its own update f(x) (no residual inside); a post-norm layer (OLMo 2)
    normalises it before adding: the target is |f(x)| / |x|, or |norm(f(x))| / |x|."""
    model = modadapt.convert(build_tiny(kind), router="topk", capacity=0.5, layers=[1, 3], scope=scope)
    data = collect(model, batches())
    dense, batch = build_tiny(kind), batches()[0]
    real = batch["attention_mask"].bool()
    for index in (1, 3):
        layer = dense.model.layers[index]
        sublayer = layer.self_attn if scope == "attention" else layer.mlp
        seen = {}

        def inputs(module, args, kwargs, output, seen=seen):
            seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen["f"] = output[0] if isinstance(output, tuple) else output

        hooks = [sublayer.register_forward_hook(inputs, with_kwargs=True)]
        if kind == "olmo2":  # the norm after the attention: what reaches the residual
            hooks.append(
                layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, seen=seen: seen.update(f=o))
            )
        with torch.no_grad():
            dense(**batch)
        for hook in hooks:
            hook.remove()
        x, f = seen["x"][real].double(), seen["f"][real].double()
        torch.testing.assert_close(data[index][0], x)
        torch.testing.assert_close(data[index][1], torch.log(f.norm(dim=-1)) - torch.log(x.norm(dim=-1)))
    assert set(fit_router_scores(model, batches())) == {1, 3}
