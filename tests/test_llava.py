"""LLaVA adapter, `shared-vl` router, masked routing, and the `llava-adapt` data checks."""

from __future__ import annotations

import json

import pytest
import torch

import modadapt
from modadapt.adapters.hf.llava import role_stats
from modadapt.errors import ModAdaptError
from modadapt.mod_layer import state_of
from modadapt.plugins import find_adapter

IMG = 3  # tiny-llava's image token id
N_IMG = 16  # image tokens per image in tiny-llava


def llava(**convert):
    model = modadapt.build_preset("tiny-llava")
    if convert:
        modadapt.convert(model, **convert)
    return model


def randomize(model, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for layer in modadapt.mod_layers(model):
            router = layer.router
            if id(router) in seen:
                continue
            seen.add(id(router))
            score = getattr(router, "classifier", None) or router.scorer
            score.weight.copy_(torch.randn(score.weight.shape, generator=generator) * scale)
    return model


def prompt(before: int, after: int, seed: int) -> torch.Tensor:
    """Text, an image (16 placeholders) in the middle of the prompt, more text."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.randint(4, 256, (before,), generator=g),
            torch.full((N_IMG,), IMG),
            torch.randint(4, 256, (after,), generator=g),
        ]
    )


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_adapter_matches_llava_only():
    assert find_adapter(llava()).name == "llava"
    assert find_adapter(modadapt.build_preset("tiny-llama")).name == "hf-decoder"


def test_fresh_shared_vl_equals_dense():
    ids = prompt(3, 5, 0)[None]
    dense = llava()
    ref = dense(input_ids=ids, pixel_values=pixels(1)).logits
    model = llava(router="shared-vl", capacity=0.4, layers="all-but-first")
    assert torch.equal(model(input_ids=ids, pixel_values=pixels(1)).logits, ref)  # eval: p = 0.5 keeps all
    model.train()
    out = model(input_ids=ids, pixel_values=pixels(1), labels=ids)
    assert torch.isfinite(out.loss) and out.router_aux_loss is not None


def test_protected_tokens_never_skipped_and_not_counted():
    model = randomize(llava(router="shared-vl", capacity=0.3, layers="all-but-first")).train()
    ids = torch.stack([prompt(4, 6, 1), prompt(7, 3, 2)])
    labels = ids.clone()
    labels[:, :-2] = -100  # the last two tokens are the answer, everything before is the prompt
    model(input_ids=ids, pixel_values=pixels(2), labels=labels)
    image = ids == IMG
    question = ~image & (labels == -100)
    routed = ~question
    for layer in modadapt.mod_layers(model):
        keep = layer.mod_state.last_keep
        assert keep[question].all()
        # capacity applies to the routed tokens only (image + answer): ceil(0.3 * 18) = 6 per row
        assert keep[routed].view(2, -1).sum(1).tolist() == [6, 6]
    stats = role_stats(model)
    assert all(row["question_kept_fraction"] == 1.0 for row in stats)
    assert all(row["image_tokens"] == 2 * N_IMG for row in stats)


@pytest.mark.parametrize(
    "protect,route,expect_text_forced",
    [
        ("question+answer", "all", True),
        ("none", "all", False),
        ("none", "image", True),
    ],
)
def test_protect_and_route_options(protect, route, expect_text_forced):
    model = randomize(
        llava(router="topk", capacity=0.25, layers=[1, 3], adapter_kwargs={"protect": protect, "route": route})
    ).train()
    ids = prompt(5, 5, 3)[None]
    labels = ids.clone()
    labels[:, :-3] = -100
    model(input_ids=ids, pixel_values=pixels(1), labels=labels)
    text = ids != IMG
    for layer in modadapt.mod_layers(model):
        keep = layer.mod_state.last_keep
        assert bool(keep[text].all()) == expect_text_forced
        if expect_text_forced:
            assert int(keep[~text].sum()) == 4  # ceil(0.25 * 16): only image tokens are routed


def test_bad_adapter_option_is_clear_error():
    with pytest.raises(ModAdaptError, match="protect must be one of"):
        llava(router="topk", adapter_kwargs={"protect": "answers"})
    with pytest.raises(ModAdaptError, match="has no option 'routes'"):
        llava(router="topk", adapter_kwargs={"routes": "image"})


def test_image_masks_with_image_not_first_and_left_padding():
    model = randomize(
        llava(router="shared-vl", capacity=0.5, layers="all-but-first", adapter_kwargs={"inference_text": "routed"})
    )
    prompts = [prompt(2, 9, 4), prompt(8, 1, 5)]
    ids, mask = left_pad(prompts)
    px = pixels(2, seed=1)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        roles = state_of(model).adapter.last_roles
        keeps = [layer.mod_state.last_keep.clone() for layer in modadapt.mod_layers(model)]
        width = ids.shape[1]
        for row, p in enumerate(prompts):
            expect = torch.zeros(width, dtype=torch.bool)
            start = width - len(p) + int((p == IMG).nonzero()[0])
            expect[start : start + N_IMG] = True
            assert torch.equal(roles.extra["image"][row], expect)
            assert not roles.extra["question"][row][: width - len(p)].any()  # padding is no role
            alone = model(input_ids=p[None], pixel_values=px[row : row + 1]).logits
            torch.testing.assert_close(batched[row, width - len(p) :], alone[0], atol=1e-5, rtol=1e-5)
            for keep, layer in zip(keeps, modadapt.mod_layers(model)):
                assert torch.equal(keep[row, width - len(p) :], layer.mod_state.last_keep[0])
    skipped = [int((~k & roles.extra["image"]).sum()) for k in keeps]
    assert sum(skipped) > 0  # the routers really skip image tokens


def test_shared_router_is_one_parameter_set():
    dense_params = len(list(llava().parameters()))
    model = llava(router="shared-vl", capacity=0.5, layers="all-but-first")
    routers = [layer.router for layer in modadapt.mod_layers(model)]
    assert len(routers) == 3 and all(r is routers[0] for r in routers)
    assert len(list(model.parameters())) == dense_params + 2  # one Linear(d, 2): weight + bias
    keys = [k for k in model.state_dict() if ".router.classifier." in k]
    assert len(keys) == 6 and len({model.state_dict()[k].data_ptr() for k in keys}) == 2
    calibration = [k for k in model.state_dict() if ".router.calibrat" in k]  # one shared cut-off too
    assert len(calibration) == 6 and len({model.state_dict()[k].data_ptr() for k in calibration}) == 2
    per_layer = llava(router="shared-vl", capacity=0.5, layers="all-but-first", router_kwargs={"per_layer": True})
    assert len(list(per_layer.parameters())) == dense_params + 6


@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_batched_generation_equals_per_sample(packing):
    model = randomize(
        llava(
            router="shared-vl",
            capacity=0.5,
            layers="all-but-first",
            packing=packing,
            adapter_kwargs={"inference_text": "routed"},
        ),
        seed=1,
    )
    prompts = [prompt(1, 6, 6), prompt(6, 2, 7)]
    ids, mask = left_pad(prompts)
    px = pixels(2, seed=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], pixel_values=px[row : row + 1], **kwargs)
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, len(p) :])
        full = model(input_ids=alone, pixel_values=px[row : row + 1]).logits  # prefill + decode == full forward
        assert torch.equal(full[0, len(p) - 1 : -1].argmax(-1), alone[0, len(p) :])


def test_save_load_round_trip(tmp_path):
    model = randomize(llava(router="shared-vl", capacity=0.5, layers=[1, 2], adapter_kwargs={"route": "image"}))
    ids = prompt(3, 3, 8)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels(1)).logits
    modadapt.save(model, tmp_path / "m")
    loaded = modadapt.load(tmp_path / "m")
    assert state_of(loaded).config.adapter_kwargs == {"route": "image"}
    assert modadapt.mod_layers(loaded)[0].router is modadapt.mod_layers(loaded)[1].router
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels(1)).logits, ref)


# --- llava-adapt recipe -----------------------------------------------------------------------------
def write_data(root, records=None, n=6):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(root / f"{i}.png")
    if records is None:
        records = [
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "What is <image>\nthis?"},
                    {"from": "gpt", "value": str(i)},
                ],
            }
            for i in range(n)
        ]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


GOOD = {
    "image": "0.png",
    "conversations": [{"from": "human", "value": "<image>\nDigit?"}, {"from": "gpt", "value": "0"}],
}


@pytest.mark.parametrize(
    "bad,message",
    [
        ({**GOOD, "image": "missing.png"}, r"record 1 \(id 'b'\): image file .*missing.png does not exist"),
        (
            {**GOOD, "conversations": [{"from": "human", "value": "Digit?"}, {"from": "gpt", "value": "0"}]},
            r"record 1 \(id 'b'\): the first human turn must contain <image>",
        ),
        (
            {**GOOD, "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "0"}]},
            r"record 1 \(id 'b'\): turn 0 is from 'gpt' but turns must alternate",
        ),
        (
            {**GOOD, "conversations": [{"from": "human", "value": "<image>"}, {"from": "bot", "value": "0"}]},
            r"record 1 \(id 'b'\): turn 1 has unknown role 'bot'",
        ),
    ],
)
def test_bad_llava_json_names_the_record(tmp_path, bad, message):
    from modadapt.recipes.llava_adapt import read_records

    path = write_data(tmp_path, [{**GOOD, "id": "a"}, {**bad, "id": "b"}], n=1)
    with pytest.raises(ModAdaptError, match=message):
        read_records(path)


def test_llava_adapt_recipe_trains_resumes_and_summarises(tmp_path, capsys, caplog):
    from modadapt.cli import main

    data = write_data(tmp_path / "data")
    flags = [
        "train",
        "llava-adapt",
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "-o",
        str(tmp_path / "run"),
        "--batch-size",
        "3",
        "--capacity",
        "0.5",
        "--layers",
        "1,3",
        "--no-progress",
        "--cpu",
        "--max-new-tokens",
        "2",
    ]
    assert main([*flags, "--max-steps", "1"]) == 0
    # the shared router is one tensor under several names: no warning about it on every save
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    assert main(["train", "llava-adapt", "-o", str(tmp_path / "run"), "--max-steps", "2", "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["mod_config"]["router"] == "shared-vl"
    roles = summary["eval"]["kept_fraction_by_role"]
    assert set(roles) == {"1", "3"} and all(r["question"] == 1.0 for r in roles.values())
    flops = summary["flops_per_sample"]
    assert flops["dense"] > 0 and flops["ratio"] == pytest.approx(flops["mod"] / flops["dense"])
    assert modadapt.mod_layers(modadapt.load(tmp_path / "run" / "model"))
    capsys.readouterr()
    # `modadapt eval` of the run (its --max-new-tokens 2) gives the run's own accuracy and loss.
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--json", "--quiet", "--batch-size", "32"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == summary["eval"]["accuracy"] and again["samples"] == 6
    assert again["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    assert again["kept_fraction"] == pytest.approx(summary["eval"]["kept_fraction"])
    assert main([*flags, "--max-steps", "1"]) == 2  # a non-empty run directory is refused
    assert "not empty" in capsys.readouterr().err


def test_llava_adapt_inference_routing_reaches_the_model(tmp_path, capsys):
    from modadapt.cli import main
    from modadapt.recipes.llava_adapt import LlavaRecipeConfig

    with pytest.raises(ModAdaptError, match="inference_routing must be one of"):
        LlavaRecipeConfig(data="x.json", output=str(tmp_path / "r"), inference_routing="lookahead")
    data = write_data(tmp_path / "data")
    assert (
        main(
            [
                "train",
                "llava-adapt",
                "--data",
                str(data),
                "-o",
                str(tmp_path / "run"),
                "--batch-size",
                "3",
                "--capacity",
                "0.5",
                "--layers",
                "1",
                "--no-progress",
                "--cpu",
                "--max-steps",
                "1",
                "--inference-routing",
                "topk",
            ]
        )
        == 0
    )

    assert state_of(modadapt.load(tmp_path / "run" / "model")).config.inference_routing == "topk"


def test_llava_adapt_distills_from_the_dense_model(tmp_path, monkeypatch):
    """`--distill W` adds W x KL(model before conversion || model) on the answer tokens only."""
    from modadapt.cli import main
    from modadapt.recipes import llava_adapt
    from modadapt.recipes.llava_adapt import LlavaRecipeConfig

    with pytest.raises(ModAdaptError, match="distill must be >= 0"):
        LlavaRecipeConfig(data="x.json", output=str(tmp_path / "r"), distill=-1.0)
    seen = []
    real = llava_adapt.distillation_kl

    def spy(student, teacher, temperature, mask):
        seen.append((mask.sum().item(), mask.shape, temperature, float(real(teacher, teacher, temperature, mask))))
        return real(student, teacher, temperature, mask)

    monkeypatch.setattr(llava_adapt, "distillation_kl", spy)
    data = write_data(tmp_path / "data")
    losses = []
    for distill in ("0", "5"):
        assert (
            main(
                [
                    "train",
                    "llava-adapt",
                    "--data",
                    str(data),
                    "-o",
                    str(tmp_path / f"run{distill}"),
                    "--batch-size",
                    "3",
                    "--capacity",
                    "0.5",
                    "--layers",
                    "1,3",
                    "--no-progress",
                    "--cpu",
                    "--max-steps",
                    "2",
                    "--distill",
                    distill,
                    "--distill-temperature",
                    "2",
                ]
            )
            == 0
        )
        losses.append(json.loads((tmp_path / f"run{distill}" / "summary.json").read_text())["final_train_loss"])
    assert len(seen) == 2  # only the distilling run, once per step
    for answer_tokens, _shape, temperature, self_kl in seen:
        assert (
            answer_tokens == 3 * 2 and temperature == 2.0 and self_kl == pytest.approx(0.0, abs=1e-6)
        )  # "0".."5" + eos
    assert losses[1] != losses[0]


def test_distillation_kl_counts_only_masked_tokens():
    from modadapt.recipes.training import distillation_kl

    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    expected = torch.nn.functional.kl_div(
        student[1, 2].log_softmax(-1), teacher[1, 2].log_softmax(-1), log_target=True, reduction="sum"
    )
    assert float(distillation_kl(student, teacher, 1.0, mask)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_kl(student, teacher, 1.0, torch.zeros_like(mask))) == 0.0


def test_shared_router_calibrates_each_layer_apart(tmp_path):
    """One shared parameter set, but each layer's scores have their own distribution (a single
    shared cut-off kept 30% of the image tokens at one layer and 5.5% at the next on digits): each
    layer records its own cut-off, the one that keeps the capacity of the batch's image tokens."""
    model = randomize(llava(router="shared-vl", capacity=0.25, layers="all-but-first"))
    router = modadapt.mod_layers(model)[0].router
    assert router.calibrated_threshold.shape == (3,)
    scores = []
    hook = router.classifier.register_forward_hook(
        lambda m, a, out: scores.append((out[..., 1] - out[..., 0]).detach())
    )
    ids = torch.stack([prompt(5, 7, seed) for seed in range(4)])
    image = ids == IMG
    model.train()
    model(input_ids=ids, pixel_values=pixels(4))
    hook.remove()
    assert router.calibration_steps.tolist() == [1, 1, 1]
    for slot, (layer, score) in enumerate(zip(modadapt.mod_layers(model), scores)):
        routed = layer.mod_state.last_keep & image  # the top ceil(0.25 * 16) = 4 image tokens per row
        assert routed.sum(1).tolist() == [4] * 4
        boundary = score[image].sort(descending=True).values[15]  # the 16th best of the 64 image tokens
        torch.testing.assert_close(router.calibrated_threshold[slot], boundary)
    assert len(set(router.calibrated_threshold.tolist())) == 3
    modadapt.save(model, tmp_path / "m")
    loaded = modadapt.mod_layers(modadapt.load(tmp_path / "m"))[0].router
    assert torch.equal(loaded.calibrated_threshold, router.calibrated_threshold)


@pytest.mark.parametrize("converted", [False, True])
def test_graphed_decoder_image_prompt(converted):
    """The image prompt is prefilled eagerly (pixel_values with it), the text after it decoded from
    the static cache (`cuda_graphs=False`): model.generate's tokens, batch 1 and left-padded."""
    from modadapt.decoding import GraphedDecoder

    if converted:
        with pytest.raises(ModAdaptError, match="keeps every text token.*inference_text.*model.generate"):
            GraphedDecoder(llava(router="threshold-p", layers="all-but-first").eval())  # the default: dense text
    image_prompt_decodes_as_generate(converted, "cpu", cuda_graphs=False)
    ids, _ = left_pad([prompt(1, 6, 6)])
    with pytest.raises(ModAdaptError, match="takes no pixel_values"):
        GraphedDecoder(modadapt.build_preset("tiny-llama").eval()).generate(
            ids, pixel_values=pixels(1), max_new_tokens=2
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("converted", [False, True])
def test_graphed_decoder_image_prompt_captured_on_cuda(converted):
    """The same in float32 on CUDA, the text decoded from captured graphs.
    Run on the GPU machine: `python -m pytest tests/test_llava.py -k cuda`."""
    image_prompt_decodes_as_generate(converted, "cuda", cuda_graphs=True)


def image_prompt_decodes_as_generate(converted: bool, device: str, cuda_graphs: bool) -> None:
    from modadapt.decoding import GraphedDecoder

    if converted:
        model = llava(router="threshold-p", layers="all-but-first", adapter_kwargs={"inference_text": "routed"})
        model = randomize(model, seed=1)
    else:
        model = llava()
    model.eval().to(device)
    prompts = [prompt(1, 6, 6), prompt(6, 2, 7)]
    ids, mask = left_pad(prompts)
    px = pixels(2, seed=2)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    decoder = GraphedDecoder(model, cuda_graphs=cuda_graphs)
    with torch.no_grad():
        for x, m, p in ((prompts[0][None], None, px[:1]), (ids, mask, px)):
            x, p = x.to(device), p.to(device)
            m = m.to(device) if m is not None else None
            expected = model.generate(input_ids=x, attention_mask=m, pixel_values=p, min_new_tokens=6, **kwargs)
            got = decoder.generate(x, attention_mask=m, pixel_values=p, max_new_tokens=6, pad_token_id=0)
            assert (decoder.last_step.graphs is not None) == cuda_graphs
            assert torch.equal(got, expected)
