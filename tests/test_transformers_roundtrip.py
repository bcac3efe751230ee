"""A converted model round-trips through transformers' own saving and loading.

`Trainer.save_model` (and a Trainer checkpoint) writes a directory `modadapt.load` reads;
`AutoModelForCausalLM.from_pretrained` of a MoD directory restores the MoD model when modadapt is
imported and is refused without it, never a dense model with the router weights dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import modadapt
from modadapt import ModAdaptError
from modadapt.mod_layer import state_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(tiny, randomize_routers, family="llama", **kwargs):
    model = modadapt.convert(tiny(family), **{"router": "topk", "capacity": 0.5, **kwargs})
    return randomize_routers(model, scale=0.5)


def _same_model(a, b, ids):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert state_of(b).config.to_dict() == {**state_of(a).config.to_dict(), "layers": state_of(a).layer_indices}
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(ids).logits, a.eval()(ids).logits, rtol=0, atol=0)


def test_trainer_save_model_and_checkpoints_load_with_modadapt(core_family, tiny, ids, randomize_routers, tmp_path):
    model = _converted(tiny, randomize_routers, core_family)  # llama, and gpt2's tied embeddings
    data = [{"input_ids": row, "labels": row.clone()} for row in ids(4, 16, seed=5)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    x = ids(2, 12, seed=1)
    for directory in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert (directory / "modadapt.json").is_file()
        assert json.loads((directory / "config.json").read_text())["model_type"] == "modadapt"
        _same_model(model, modadapt.load(directory), x)
        # the byte-level preset's tokenizer comes along (Trainer had none to save)
        assert transformers.AutoTokenizer.from_pretrained(directory)("hi")["input_ids"] == [104, 105]


def test_save_pretrained_of_a_shared_router(tiny, tmp_path):
    model = modadapt.convert(tiny("llava"), router="shared-vl", capacity=0.5, layers=[1, 3])
    model.save_pretrained(tmp_path / "llava")  # transformers refuses shared tensors it does not know as tied
    loaded = modadapt.load(tmp_path / "llava")
    first, second = modadapt.mod_layers(loaded)
    assert first.router is second.router
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())


def test_save_pretrained_after_unload_is_transformers_own(tiny, randomize_routers, tmp_path):
    model = _converted(tiny, randomize_routers)
    modadapt.unload(model)
    model.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense" / "modadapt.json").exists()
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("writer", ["modadapt.save", "save_pretrained"])
def test_auto_model_from_pretrained_restores_the_mod_model(writer, tiny, ids, randomize_routers, tmp_path):
    model = _converted(tiny, randomize_routers, router="threshold-p", layers=[1, 3])
    directory = tmp_path / "mod"
    modadapt.save(model, directory) if writer == "modadapt.save" else model.save_pretrained(directory)
    restored = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert [layer.mod_state.index for layer in modadapt.mod_layers(restored)] == [1, 3]
    _same_model(model, restored, ids(2, 12, seed=3))
    half = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16 and modadapt.mod_layers(half)
    with pytest.raises(ModAdaptError, match="quantization_config is not supported"):
        transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config={"bits": 4})


def test_a_dense_class_never_loads_a_mod_directory_silently(tiny, randomize_routers, tmp_path):
    """Without modadapt imported, transformers refuses the directory (it would otherwise build the
    dense model, drop the router weights as "unexpected" and compute different logits)."""
    model = _converted(tiny, randomize_routers)
    model.save_pretrained(tmp_path / "mod")
    code = (
        "import sys, transformers\n"
        "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert 'modadapt' not in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "mod")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode != 0
    assert "model type `modadapt`" in done.stderr


def test_save_pretrained_refuses_what_modadapt_cannot_read_back(tiny, tmp_path):
    model = modadapt.convert(tiny("llama"), router="topk", capacity=0.5)
    with pytest.raises(ModAdaptError, match="upload"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(ModAdaptError, match="variant"):
        model.save_pretrained(tmp_path / "v", variant="fp16")
    assert not (tmp_path / "hub").exists() and not (tmp_path / "v").exists()


def test_load_reads_a_sharded_save_pretrained(tiny, ids, randomize_routers, tmp_path):
    model = _converted(tiny, randomize_routers)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _same_model(model, modadapt.load(tmp_path / "sharded"), ids(1, 8))
    os.remove(next((tmp_path / "sharded").glob("model-00001-*.safetensors")))
    with pytest.raises(ModAdaptError, match="lacks the weight shards"):
        modadapt.load(tmp_path / "sharded")
