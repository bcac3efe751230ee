"""The command line: convert presets and local directories, clear one-line errors, no half-written output."""

import json

import pytest
import torch

import modadapt
from modadapt.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_preset_and_load(tmp_path, capsys):
    out = tmp_path / "mod"
    code, stdout, _ = run(
        capsys,
        "convert",
        "tiny-llama",
        "--router",
        "topk",
        "--capacity",
        "0.5",
        "--layers",
        "1,3",
        "--router-arg",
        "aux_coef=0.1",
        "--packing",
        "padded",
        "--pack-bucket",
        "128",
        "--pack-reserve",
        "0.5",
        "-o",
        str(out),
    )
    assert code == 0
    assert "layers [1, 3]" in stdout and "router" in stdout and "parameters" in stdout
    meta = json.loads((out / "modadapt.json").read_text())
    assert meta["mod_config"]["layers"] == [1, 3]
    assert meta["mod_config"]["router_kwargs"] == {"aux_coef": 0.1}
    assert meta["mod_config"]["packing"] == "padded" and meta["mod_config"]["pack_bucket"] == 128
    model = modadapt.load(out)
    assert model._modadapt_state.config.pack_bucket == 128 and model._modadapt_state.config.pack_reserve == 0.5
    assert [layer.mod_state.index for layer in modadapt.mod_layers(model)] == [1, 3]
    assert modadapt.mod_layers(model)[0].router.aux_coef == 0.1


def test_convert_local_directory_with_tokenizer_files(tmp_path, capsys):
    src = tmp_path / "dense"
    modadapt.build_preset("tiny-gpt2").save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "mod"
    code, _, _ = run(capsys, "convert", str(src), "--router", "threshold-p", "--router-arg", "p=0.7", "-o", str(out))
    assert code == 0
    assert (out / "tokenizer_config.json").is_file()
    model = modadapt.load(out)
    assert modadapt.mod_layers(model)[0].router.p == 0.7
    ids = torch.randint(0, 256, (1, 8))
    dense = modadapt.build_preset("tiny-gpt2")
    with torch.no_grad():  # loaded weights are the dense source's, routers fresh: same logits in eval
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=0, atol=0)


def test_convert_with_config_file_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "mod.yaml"
    cfg.write_text("router: random\ncapacity: 0.25\nlayers: all-but-first\n")
    out = tmp_path / "mod"
    code, stdout, _ = run(capsys, "convert", "tiny-qwen2", "-c", str(cfg), "--capacity", "0.5", "-o", str(out))
    assert code == 0
    meta = json.loads((out / "modadapt.json").read_text())["mod_config"]
    assert (meta["router"], meta["capacity"], meta["layers"]) == ("random", 0.5, [1, 2, 3])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tiny-llama", "--router", "nope"], "unknown router 'nope'"),
        (["tiny-llama", "--capacity", "0"], "capacity must be in (0, 1]"),
        (["tiny-llama", "--capacity", "1.5"], "capacity must be in (0, 1]"),
        (["tiny-llama", "--layers", "0,1"], "layer 0 cannot be converted"),
        (["tiny-llama", "--layers", "7"], "out of range"),
        (["tiny-llama", "--layers", "one"], "is not a layer list"),
        (["tiny-llama", "--layers", "1,3,1"], "names layer 1 more than once"),
        (["tiny-llama", "--router-arg", "p"], "KEY=VALUE"),
        (["tiny-llama", "--router", "threshold-p", "--router-arg", "p=2"], "p must be in (0, 1)"),
        (["tiny-llama", "--router", "topk", "--router-arg", "bogus=1"], "has no argument 'bogus'"),
        (["tiny-llama", "--router", "threshold-p", "--capacity", "0.5"], "takes no --capacity"),
        (["no/such/dir"], "neither a local directory nor a preset"),
    ],
)
def test_bad_input_is_one_clear_line_and_no_output(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "convert", *argv, "-o", str(out))
    assert code == 2
    assert message in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("modadapt: error: ")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_directory_without_config_is_rejected(tmp_path, capsys):
    src = tmp_path / "notamodel"
    src.mkdir()
    code, _, stderr = run(capsys, "convert", str(src), "-o", str(tmp_path / "out"))
    assert code == 2 and "no config.json" in stderr


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run(capsys, "convert", "tiny-llama", "-o", str(out))
    assert code == 2 and "not empty" in stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what modadapt wrote: a directory of someone else's files is refused.
    code, _, stderr = run(capsys, "convert", "tiny-llama", "-o", str(out), "--overwrite")
    assert code == 2 and "was not written by modadapt" in stderr and stderr.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    assert main(["convert", "tiny-llama", "-o", str(mine)]) == 0
    assert main(["convert", "tiny-llama", "--router", "topk", "-o", str(mine), "--overwrite"]) == 0
    assert json.loads((mine / "modadapt.json").read_text())["mod_config"]["router"] == "topk"


def test_list_json(capsys):
    code, stdout, _ = run(capsys, "list", "routers", "--json")
    rows = {row["name"]: row for row in json.loads(stdout)}
    assert code == 0 and {"topk", "threshold-p", "random"} <= set(rows)
    assert rows["threshold-p"]["arguments"]["p"] == 0.5 and rows["topk"]["provider"] == "modadapt"
    assert rows["topk"]["arguments"]["causal_threshold"] == "calibrated"  # learnt cut-offs are named, not None
    assert (
        rows["attention"]["arguments"]["threshold"] == "calibrated"
        and rows["threshold-p"]["arguments"]["target"] == 0.5
    )
    code, stdout, _ = run(capsys, "list", "adapters", "--json")
    assert any(row["name"] == "hf-decoder" for row in json.loads(stdout))


def test_demo_checks_cache_against_full_forward(tmp_path, capsys):
    code, stdout, _ = run(capsys, "demo", "--router", "topk", "-o", str(tmp_path / "demo"))
    assert code == 0
    assert "max |cached - full recompute|" in stdout
    assert (tmp_path / "demo" / "model.safetensors").is_file()


def test_demo_refuses_an_existing_output_before_generating(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    code, stdout, stderr = run(capsys, "demo", "-o", str(tmp_path / "demo"))
    assert code == 2 and stdout == "" and "not empty" in stderr
    code, stdout, stderr = run(capsys, "demo", "-o", str(tmp_path / "demo"), "--overwrite")
    assert code == 2 and stdout == "" and "was not written by modadapt" in stderr
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["notes.txt"]


def test_convert_llava_with_adapter_options(tmp_path, capsys):
    out = tmp_path / "mod"
    code, _, _ = run(
        capsys,
        "convert",
        "tiny-llava",
        "--router",
        "shared-vl",
        "--capacity",
        "0.5",
        "--layers",
        "1,3",
        "--adapter-arg",
        "protect=question+answer",
        "--adapter-arg",
        "route=image",
        "-o",
        str(out),
    )
    assert code == 0
    meta = json.loads((out / "modadapt.json").read_text())["mod_config"]
    assert meta["adapter_kwargs"] == {"protect": "question+answer", "route": "image"}
    code, _, err = run(capsys, "convert", "tiny-llava", "--adapter-arg", "bogus=1", "-o", str(tmp_path / "bad"))
    assert code == 2 and "has no option 'bogus'" in err and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Saved ViT, LLaVA and Llama models, image folders and a LLaVA-format JSON: inputs to give the
    wrong command."""
    from PIL import Image

    root = tmp_path_factory.mktemp("others")
    for preset, router in (("tiny-vit", "attention"), ("tiny-llava", "shared-vl"), ("tiny-llama", "topk")):
        model = modadapt.build_preset(preset)
        modadapt.convert(model, router=router, capacity=0.5)
        modadapt.save(model, root / (preset if preset != "tiny-llama" else "tiny-llama-mod"))
    for split in ("train", "validation"):
        for label in "ab":
            (root / "images" / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "images" / split / label / "0.png")
    for label in range(11):  # one class more than the tiny ViT's head
        (root / "many" / f"c{label:02d}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "many" / f"c{label:02d}" / "0.png")
    Image.new("RGB", (8, 8)).save(root / "0.png")
    (root / "llava.json").write_text(
        json.dumps(
            [
                {
                    "image": "0.png",
                    "conversations": [{"from": "human", "value": "<image>\nDigit?"}, {"from": "gpt", "value": "0"}],
                }
            ]
        )
    )
    (root / "text.txt").write_text("some text to score " * 40)
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--preset", "tiny-vit"], "demo generates text with a causal language model; preset tiny-vit is a"),
        (["demo", "--preset", "tiny-llava"], "preset tiny-llava is a LlavaForConditionalGeneration"),
        (
            ["eval", "ROOT/tiny-vit", "--data", "ROOT/images", "--seq-len", "16"],
            "--seq-len applies only to language models",
        ),
        (["eval", "ROOT/tiny-vit", "--data", "ROOT/text.txt"], "text.txt is not a directory"),
        (["eval", "ROOT/tiny-llava", "--data", "ROOT/text.txt"], "text.txt is not valid JSON"),
        (["eval", "ROOT/tiny-vit", "--data", "ROOT/many"], "has labels up to 10 but the model's head has 10 classes"),
        (
            ["eval", "ROOT/tiny-llama-mod", "--data", "ROOT/llava.json", "--max-new-tokens", "4"],
            "applies only to LLaVA",
        ),
        (
            ["train", "vit-imagenet", "--model", "tiny-llama", "--data", "ROOT/images", "--cpu"],
            "vit-imagenet trains timm vision transformers; tiny-llama is a LlamaForCausalLM",
        ),
        (
            ["train", "llava-adapt", "--model", "tiny-llama", "--data", "ROOT/llava.json", "--cpu"],
            "llava-adapt trains LLaVA models (LlavaForConditionalGeneration); tiny-llama is a LlamaForCausalLM",
        ),
    ],
)
def test_a_model_or_data_of_the_wrong_kind_is_one_line(other_models, tmp_path, capsys, argv, message):
    argv = [a.replace("ROOT", str(other_models)) for a in argv]
    if argv[0] == "train":
        argv += ["-o", str(tmp_path / "run")]
    code, stdout, stderr = run(capsys, *argv)
    lines = [line for line in stderr.split("\n") if line and not line.startswith("\r")]  # datasets' progress
    assert code == 2 and len(lines) == 1 and lines[0].startswith("modadapt: error: ") and message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_plugin_that_fails_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    from modadapt import plugins

    def broken(reload=False):
        raise modadapt.ModAdaptError("plugin 'broken' failed to load: boom")

    monkeypatch.setattr(plugins, "registry", broken)
    code, _, stderr = run(capsys, "list", "routers")
    assert code == 2 and stderr == "modadapt: error: plugin 'broken' failed to load: boom\n"


def test_every_command_prints_its_help(capsys):
    """`--help` of every command and recipe formats (a `%` in a field's help once broke it)."""
    import argparse

    from modadapt.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield (*prefix, name)
                    yield from commands(sub, (*prefix, name))

    found = list(commands(build_parser()))
    assert ("convert",) in found and any(len(c) == 2 and c[0] == "train" for c in found)
    for command in found:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage:" in capsys.readouterr().out
