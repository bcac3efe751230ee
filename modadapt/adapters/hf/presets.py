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
#: Two attention types in one stack: layers 0 and 2 are the first of their type (which size the
#: masks, so they stay dense); `every-other` converts a sliding layer (1) and a global one (3).
#: A window of 4 cuts every test sequence.
_MIXED_WINDOWS = dict(
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"], sliding_window=4
)


_EXPERTS = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, output_router_logits=True)


def _llama_like(config_name: str, model_name: str, attn: str = "sdpa", **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**{**_COMMON, **extra})
        config._attn_implementation = attn
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


def _decoder(family: str, build: Callable[[], nn.Module], what: str = "") -> Preset:
    return Preset(f"tiny-{family}", build, f"transformers {family} decoder, 4 layers, width 64{what}")


#: The decoder presets, one per family the hf-decoder adapter is tested on (`tiny-<family>`).
DECODER_PRESETS: tuple[Preset, ...] = (
    _decoder("llama", _llama_like("LlamaConfig", "LlamaForCausalLM")),
    _decoder(
        "llama-tied",
        _llama_like("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True),
        ", input and output embeddings tied (Llama 3.2 style)",
    ),
    _decoder("qwen2", _llama_like("Qwen2Config", "Qwen2ForCausalLM")),
    _decoder("qwen3", _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=16)),
    _decoder("mistral", _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None)),
    _decoder("gemma", _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=16)),
    # Soft-capped attention logits: transformers runs Gemma 2 with eager attention (SDPA has no softcap).
    _decoder(
        "gemma2",
        _llama_like("Gemma2Config", "Gemma2ForCausalLM", attn="eager", head_dim=16, **_MIXED_WINDOWS),
        ", sliding and global layers, soft-capped attention and logits",
    ),
    _decoder(
        "gemma3",
        _llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, **_MIXED_WINDOWS),
        ", sliding and global layers (their own RoPE)",
    ),
    _decoder("olmo2", _llama_like("Olmo2Config", "Olmo2ForCausalLM"), ", norms after attention and MLP"),
    _decoder("phi3", _llama_like("Phi3Config", "Phi3ForCausalLM")),
    _decoder("gpt2", _gpt2),
    # Mixtures of experts (4 experts, top 2) in every layer; `output_router_logits` on, so that the
    # experts' load-balancing loss is computed and trained (on kept tokens only).
    _decoder(
        "mixtral",
        _llama_like("MixtralConfig", "MixtralForCausalLM", sliding_window=None, **_EXPERTS),
        ", 4 experts (top 2) per layer",
    ),
    _decoder(
        "qwen2-moe",
        _llama_like(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            **_EXPERTS,
        ),
        ", 4 experts (top 2) and a shared expert per layer",
    ),
    _decoder(
        "qwen3-moe",
        _llama_like("Qwen3MoeConfig", "Qwen3MoeForCausalLM", moe_intermediate_size=32, head_dim=16, **_EXPERTS),
        ", 4 experts (top 2) per layer",
    ),
)

#: The families of `DECODER_PRESETS` (`tiny-<family>`), as the test suite names them.
DECODER_FAMILIES: tuple[str, ...] = tuple(p.name.removeprefix("tiny-") for p in DECODER_PRESETS)

PRESETS: tuple[Preset, ...] = (
    *DECODER_PRESETS,
    Preset("tiny-llava", _tiny_llava, "LLaVA: a 2-layer CLIP vision tower and a tiny Llama, 16 image tokens"),
)
