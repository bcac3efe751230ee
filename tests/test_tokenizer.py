"""The byte-level presets ship a real transformers tokenizer: ids = UTF-8 bytes, the config's
special tokens, saved with every directory modadapt writes, so text works without building one."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

import modadapt
from modadapt import ModAdaptError
from modadapt.cli import main
from modadapt.tokenizer import is_byte_level, tokenizer_for

TEXT = "héllo wörld 日本語\n\tdef f(x):  return x  # <s> </s> <pad> <|endoftext|> ā Ā\x00\x01\x02\x7f"


def test_every_text_preset_is_byte_level_with_a_matching_tokenizer(family):
    model = modadapt.build_preset(f"tiny-{family}")
    assert is_byte_level(model)
    tok = modadapt.byte_tokenizer(model)
    assert isinstance(tok, transformers.PreTrainedTokenizerBase) and len(tok) == model.config.vocab_size == 256
    assert tok(TEXT)["input_ids"] == list(TEXT.encode())  # special-token names in text are bytes too
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    config = model.config
    for role in ("pad", "bos", "eos"):
        assert getattr(tok, f"{role}_token_id") == getattr(config, f"{role}_token_id")
    special = [config.bos_token_id, *tok(" hi")["input_ids"], config.eos_token_id]
    assert tok.decode(special, skip_special_tokens=True) == " hi"


def test_llava_and_vit_presets_are_not_byte_level():
    for name in ("tiny-llava", "tiny-vit"):  # llava-adapt has its own codec (bytes shifted past the specials)
        model = modadapt.build_preset(name)
        assert not is_byte_level(model)
        with pytest.raises(ModAdaptError, match="byte-level presets"):
            modadapt.byte_tokenizer(model)
        assert tokenizer_for(model) is None


def test_saved_directories_carry_the_tokenizer_and_text_generation_works(tmp_path, capsys):
    assert main(["convert", "tiny-llama", "--router", "topk", "--capacity", "0.5", "-o", str(tmp_path / "cli")]) == 0
    assert main(["demo", "--preset", "tiny-gpt2", "-o", str(tmp_path / "demo")]) == 0
    capsys.readouterr()
    for directory in (tmp_path / "cli", tmp_path / "demo"):
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        if tok.pad_token is None:  # GPT-2 declares no padding token, as its own tokenizer does
            tok.pad_token = tok.eos_token
        model = modadapt.load(directory)
        assert tok(TEXT)["input_ids"] == list(TEXT.encode())
        batch = tok(["Hello", "a longer prompt"], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape == (2, batch["input_ids"].shape[1] + 5)
        assert tok.batch_decode(out[:, : batch["input_ids"].shape[1]], skip_special_tokens=True) == [
            "Hello",
            "a longer prompt",
        ]
        assert type(tokenizer_for(model)).__name__ == type(tok).__name__  # found through the load directory


def test_an_explicit_tokenizer_or_source_files_win(tmp_path):
    model = modadapt.convert(modadapt.build_preset("tiny-llama"), router="random", capacity=0.5)
    gpt2_style = modadapt.byte_tokenizer(modadapt.build_preset("tiny-gpt2"))
    modadapt.save(model, tmp_path / "given", tokenizer=gpt2_style)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "given").eos_token_id == 0  # not llama's 2


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install -e .[test])"
)
def test_lm_eval_model_finds_the_tokenizer(tmp_path):
    from modadapt.recipes.lm_adapt import lm_eval_model

    model = modadapt.convert(modadapt.build_preset("tiny-llama"), router="topk", capacity=0.5)
    lm = lm_eval_model(model)  # in memory: the preset's byte tokenizer
    assert lm.tok_encode("hi") == [104, 105] and lm.eot_token_id == 2
    modadapt.save(model, tmp_path / "mod")
    assert lm_eval_model(modadapt.load(tmp_path / "mod")).tok_encode("hi") == [104, 105]
    del model.config.modadapt_tokenizer  # a model of real text, loaded without its tokenizer
    with pytest.raises(ModAdaptError, match="pass tokenizer="):
        lm_eval_model(model)
