"""LLaVA-style vision-language models: `transformers.LlavaForConditionalGeneration`.

The language model's decoder layers are converted with the Hugging Face decoder machinery
(`HFDecoderAdapter`: layer stack, per-layer masks, RoPE, KV cache); the vision tower and the
projector stay dense. Token roles come from the inputs of every forward, also inside `generate()`:
image tokens are ``input_ids == config.image_token_id`` wherever they sit in the prompt, padding
comes from the 2-D ``attention_mask`` (left padding included), and question / answer text tokens
from ``labels == -100`` / ``!= -100``. The language model only receives embeddings, so the roles
are taken at the top-level model (`roles_source`).

Options (`ModConfig.adapter_kwargs`):

- ``protect``: text tokens that are always processed and do not count against the capacity
  (γ-MoD's masked routing): ``"question"`` (default; prompt tokens, i.e. ``labels == -100``),
  ``"question+answer"`` (all text), ``"none"``.
- ``route``: ``"all"`` (default) routes image and unprotected text tokens; ``"image"`` routes
  only image tokens and processes every text token (p-MoD style), for any router.
- ``inference_text``: without labels (evaluation, `generate()`) question and answer cannot be
  told apart: ``"dense"`` (default) processes every text token, ``"routed"`` lets text tokens
  decide by the router's causal rule. Image tokens are routed either way.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ...errors import ModAdaptError
from ...mod_layer import state_of
from ..base import DecodeParts, TokenRoles, host_reads_allowed, padding_free
from .decoder import HFDecoderAdapter

PROTECT = ("question", "question+answer", "none")
ROUTE = ("all", "image")
INFERENCE_TEXT = ("dense", "routed")
IGNORE_INDEX = -100


def _is_llava(model: nn.Module) -> bool:
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:
        return False
    return isinstance(model, LlavaForConditionalGeneration)


def image_token_id(config: Any) -> int:
    """The placeholder id of image tokens (`image_token_id`, alias `image_token_index`)."""
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = getattr(config, "image_token_index", None)
    if value is None:
        raise ModAdaptError("this LLaVA config has no image_token_id / image_token_index.")
    return int(value)


class LlavaAdapter(HFDecoderAdapter):
    name = "llava"
    description = "transformers LlavaForConditionalGeneration: the language model's layers; image/question roles"
    options = {"protect": "question", "route": "all", "inference_text": "dense"}

    def matches(self, model: nn.Module) -> bool:
        return _is_llava(model)

    def configure(self, **options: Any) -> None:
        super().configure(**options)
        for key, allowed in (("protect", PROTECT), ("route", ROUTE), ("inference_text", INFERENCE_TEXT)):
            if self.settings[key] not in allowed:
                raise ModAdaptError(
                    f"adapter 'llava': {key} must be one of {', '.join(allowed)}, got {self.settings[key]!r}."
                )

    def example_inputs(self, model: nn.Module, batch: int, length: int, seed: int) -> dict[str, Any]:
        """`length` text tokens around one image's placeholders (text ids avoid the special ones), and the image."""
        config = model.config
        generator = torch.Generator().manual_seed(seed)
        image = image_token_id(config)
        low = max(image, config.text_config.pad_token_id or 0) + 1
        text = torch.randint(low, config.text_config.vocab_size, (batch, length), generator=generator)
        placeholders = torch.full((batch, config.image_seq_length), image)
        before = length // 2
        vision = config.vision_config
        return {
            "input_ids": torch.cat([text[:, :before], placeholders, text[:, before:]], dim=1),
            "pixel_values": torch.randn(
                batch, vision.num_channels, vision.image_size, vision.image_size, generator=generator
            ),
        }

    def calibration_kind(self, model: nn.Module) -> str:
        return "llava"

    def roles_source(self, model: nn.Module) -> nn.Module:
        return model

    def decode_parts(self, model: nn.Module) -> DecodeParts:
        """The language model's parts: the image prompt is prefilled eagerly (`pixel_values`),
        its text decoded from the static cache. Refused when a converted model forces its text
        tokens at inference (`inference_text="dense"` or `route="image"`): the decode steps route
        every new token by its router."""
        settings = getattr(self, "settings", self.options)
        forced = settings["route"] == "image" or (
            settings["inference_text"] == "dense" and settings["protect"] != "none"
        )
        if forced and state_of(model) is not None:
            raise ModAdaptError(
                "this LLaVA model keeps every text token at inference (adapter option "
                f"inference_text={settings['inference_text']!r}, route={settings['route']!r}); GraphedDecoder routes "
                "each new token by its router instead: convert with adapter_kwargs={'inference_text': 'routed'} "
                "to decode it graphed, or decode with model.generate."
            )
        return super().decode_parts(model)

    def token_roles(self, stack_owner: nn.Module, args: tuple, kwargs: dict[str, Any]) -> TokenRoles:
        """Roles from the top-level call's `input_ids`, `attention_mask` and `labels`."""
        bound = inspect.signature(type(stack_owner).forward).bind_partial(stack_owner, *args, **kwargs).arguments
        ids, mask, labels = bound.get("input_ids"), bound.get("attention_mask"), bound.get("labels")
        real = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if padding_free(real):
            real = None
        if not isinstance(ids, torch.Tensor):  # embeddings only: no way to tell images from text
            self.last_roles = TokenRoles(real=real)
            return self.last_roles
        settings = getattr(self, "settings", self.options)
        T = ids.shape[1]
        image = ids == image_token_id(stack_owner.config)
        text = ~image if real is None else ~image & real[:, -T:]
        if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
            question = text & (labels == IGNORE_INDEX)
            answer = text & (labels != IGNORE_INDEX)
            protected = {"question": question, "question+answer": text, "none": None}[settings["protect"]]
        else:
            question, answer = text, torch.zeros_like(text)
            dense = settings["inference_text"] == "dense" and settings["protect"] != "none"
            protected = text if dense else None
        if settings["route"] == "image":
            protected = text
        if protected is not None and host_reads_allowed() and not bool(protected.any()):
            protected = None
        self.last_roles = TokenRoles(
            real=real, forced=protected, extra={"image": image, "question": question, "answer": answer}
        )
        return self.last_roles


def role_stats(model: nn.Module) -> list[dict]:
    """Kept fraction per MoD layer and token role (image, question, answer) of the last forward.

    One dict per layer: ``layer`` and, per role, ``{role}_kept`` / ``{role}_tokens`` (real tokens
    of that role in the last call) and ``{role}_kept_fraction`` (None when the role is absent).
    """
    from ...convert import mod_layers
    from ...mod_layer import state_of

    state = state_of(model)
    roles = getattr(state.adapter, "last_roles", None)
    if roles is None or not roles.extra:
        raise ModAdaptError("no LLaVA forward with input_ids has run on this model yet.")
    rows = []
    for layer in mod_layers(model):
        keep = layer.mod_state.last_keep
        row: dict = {"layer": layer.mod_state.index}
        for role, mask in roles.extra.items():
            if keep is None:
                kept = total = 0
            else:
                mask = mask[:, -keep.shape[1] :]
                kept, total = int((keep & mask).sum()), int(mask.sum())
            row[f"{role}_kept"], row[f"{role}_tokens"] = kept, total
            row[f"{role}_kept_fraction"] = kept / total if total else None
        rows.append(row)
    return rows
