"""Built-in tiny models with random weights: try the tool offline, and test every family.

`tiny-llama` etc. are full `transformers` models built from a config in code (no download);
`tiny-vit` is a timm ViT. They register through the `register_presets` hook, as a plugin's
presets do; `build_preset` builds any registered one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .hookspecs import Preset, hookimpl
from .plugins import get_preset, registry

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama_like(config_name: str, model_name: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**{**_COMMON, **extra})
        config._attn_implementation = "sdpa"
        return getattr(transformers, model_name)(config)

    return build


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def _tiny_vit() -> nn.Module:
    from .adapters.timm import create_model

    # 32x32 RGB, 4x4 patches: 64 patch tokens + a class token; 10 classes (e.g. upsampled digits).
    return create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                        num_classes=10)


def _tiny_llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    # 32x32 RGB, 8x8 patches: 16 image tokens (CLIP's class token is dropped); image token id 3.
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **_COMMON), image_token_index=3,
                         image_seq_length=16)
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


#: The built-in presets' builders, by name (all registered presets: `preset_names()`).
PRESETS: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": _llama_like("LlamaConfig", "LlamaForCausalLM"),
    "tiny-qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    "tiny-qwen3": _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=16),
    "tiny-mistral": _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "tiny-gemma": _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=16),
    "tiny-phi3": _llama_like("Phi3Config", "Phi3ForCausalLM"),
    "tiny-gpt2": _gpt2,
    "tiny-vit": _tiny_vit,
    "tiny-llava": _tiny_llava,
}


_DESCRIPTIONS = {
    "tiny-vit": "timm ViT, 32x32 images, 4x4 patches, 10 classes",
    "tiny-llava": "LLaVA: a 2-layer CLIP vision tower and a tiny Llama, 16 image tokens",
}


@hookimpl
def register_presets(register) -> None:
    for name, build in PRESETS.items():
        family = name.removeprefix("tiny-")
        register(Preset(name, build, _DESCRIPTIONS.get(name, f"transformers {family} decoder, 4 layers, width 64")))


def preset_names() -> list[str]:
    """Every registered preset (built-in and from plugins), sorted."""
    return [entry.name for entry in registry().list("preset")]


def build_preset(name: str, seed: int = 0) -> nn.Module:
    """A preset model with weights drawn from `seed` (the same seed gives the same weights)."""
    preset: Preset = get_preset(name).obj
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = preset.build()
    return model.eval()
