"""What the library asks a model's adapter instead of checking families itself: the parts of a
graphed decode step, the calibration data `analyze` reads, and which modules are linear maps."""

from __future__ import annotations

import pytest
import torch

import modadapt
from modadapt.errors import ModAdaptError
from modadapt.plugins import find_adapter


@pytest.mark.parametrize(
    "preset, kind", [("tiny-llama", "text"), ("tiny-gpt2", "text"), ("tiny-vit", "images"), ("tiny-llava", "llava")]
)
def test_calibration_kind_comes_from_the_adapter(preset, kind):
    from modadapt.metrics.calibration import calibration_kind

    model = modadapt.build_preset(preset)
    assert find_adapter(model).calibration_kind(model) == kind
    assert calibration_kind(model) == kind


def test_a_model_no_adapter_converts_still_gets_a_calibration_kind():
    from modadapt.metrics.calibration import calibration_kind

    class Encoder(torch.nn.Module):
        config = type("Config", (), {"vocab_size": 10, "model_type": "bert"})()

    assert calibration_kind(Encoder()) == "text"
    assert calibration_kind(torch.nn.Linear(2, 2)) is None


def test_linear_maps_include_gpt2_conv1d():
    gpt2, llama = modadapt.build_preset("tiny-gpt2"), modadapt.build_preset("tiny-llama")
    adapter = find_adapter(gpt2)
    conv = next(m for m in gpt2.modules() if type(m).__name__ == "Conv1D")
    assert adapter.is_linear_map(conv) and adapter.is_linear_map(torch.nn.Linear(2, 2))
    assert adapter.transposed_linear_weights(gpt2) and not find_adapter(llama).transposed_linear_weights(llama)
    vit = modadapt.build_preset("tiny-vit")
    assert not find_adapter(vit).is_linear_map(conv) and not find_adapter(vit).transposed_linear_weights(vit)


def test_decode_parts_come_from_the_adapter():
    model = modadapt.build_preset("tiny-llama")
    parts = find_adapter(model).decode_parts(model)
    assert parts.embed is model.model.embed_tokens and parts.head is model.lm_head
    assert (parts.kv_heads, parts.head_dim, parts.windows) == (2, 16, (None,) * 4)
    vit = modadapt.build_preset("tiny-vit")
    with pytest.raises(ModAdaptError, match="graphed decoding supports no model of adapter 'timm-vit'"):
        modadapt.GraphedDecoder(vit)
