"""Tiny transformers models with random weights, one per family of this folder: full models built
from a config in code (no download), so that every family can be tried offline and tested.

The text decoders read UTF-8 bytes (a 256-token vocabulary) and are marked byte-level, so that they
come with a real tokenizer (`modadapt.tokenizer.byte_tokenizer`). `tiny-llava` is not: the
llava-adapt recipe encodes its text with its own byte codec (bytes shifted past the special ids)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...hookspecs import Preset
from ...tokenizer import mark_byte_level

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _llama_like(config_name: str, model_name: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**{**_COMMON, **extra})
        config._attn_implementation = "sdpa"
        return mark_byte_level(getattr(transformers, model_name)(config))

    return build


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    return mark_byte_level(GPT2LMHeadModel(config))


def _tiny_llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    # 32x32 RGB, 8x8 patches: 16 image tokens (CLIP's class token is dropped); image token id 3.
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=dict(model_type="llama", **_COMMON), image_token_index=3, image_seq_length=16
    )
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def _decoder(family: str, build: Callable[[], nn.Module]) -> Preset:
    return Preset(f"tiny-{family}", build, f"transformers {family} decoder, 4 layers, width 64")


PRESETS: tuple[Preset, ...] = (
    _decoder("llama", _llama_like("LlamaConfig", "LlamaForCausalLM")),
    _decoder("qwen2", _llama_like("Qwen2Config", "Qwen2ForCausalLM")),
    _decoder("qwen3", _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=16)),
    _decoder("mistral", _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None)),
    _decoder("gemma", _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=16)),
    _decoder("phi3", _llama_like("Phi3Config", "Phi3ForCausalLM")),
    _decoder("gpt2", _gpt2),
    Preset("tiny-llava", _tiny_llava, "LLaVA: a 2-layer CLIP vision tower and a tiny Llama, 16 image tokens"),
)
