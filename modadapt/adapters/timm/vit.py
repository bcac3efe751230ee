"""timm Vision Transformers: ViT, DeiT, DeiT3 (LayerScale), distilled DeiT, register tokens.

The layer stack is `model.blocks`; each block is called as `block(x, attn_mask=None, ...)` with
bidirectional attention and no cache. The `model.num_prefix_tokens` leading tokens (class,
distillation, registers) are processed by every MoD layer. Since the roles never depend on the
inputs, `forward_features`, `forward_head`, gradient checkpointing (which calls the blocks one by
one) and `torch.compile` need no hook on the model's own forward.

Saving records the timm model name and its creation arguments; `build` calls
`timm.create_model(name, pretrained=False, **kwargs)`. Models made with `create_model` below keep
their exact arguments; for others they are read off the model and checked at save time.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...attention_probe import AttentionProbe
from ...errors import ModAdaptError
from ..base import Adapter, AttentionMapCallback, LayerCall

KWARGS_ATTR = "_modadapt_timm_kwargs"


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)` that remembers `kwargs` for saving."""
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    object.__setattr__(model, KWARGS_ATTR, dict(kwargs))
    return model


def _is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


class TimmViTAdapter(Adapter):
    name = "timm-vit"
    description = "timm VisionTransformer family: ViT, DeiT, DeiT3, distilled DeiT, register tokens"

    def matches(self, model: nn.Module) -> bool:
        return _is_timm_vit(model)

    def layer_stack(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
            raise ModAdaptError(f"{type(model).__name__} has no `blocks` stack to convert.")
        return blocks, blocks

    def hidden_size(self, model: nn.Module) -> int:
        return model.embed_dim

    def example_inputs(self, model: nn.Module, batch: int, length: int, seed: int) -> dict[str, Any]:
        """Random images at the model's native size (the token count is the model's: `length` is unused)."""
        size = tuple(model.patch_embed.img_size)
        return {
            "x": torch.randn(
                batch, model.patch_embed.proj.in_channels, *size, generator=torch.Generator().manual_seed(seed)
            )
        }

    def calibration_kind(self, model: nn.Module) -> str:
        return "images"

    def validate_layers(self, model: nn.Module, layers: list[int]) -> None:
        _, blocks = self.layer_stack(model)
        for i in layers:
            attn = getattr(blocks[i], "attn", None)
            if attn is None:
                raise ModAdaptError(
                    f"block {i} of {type(model).__name__} has no `attn` module; it cannot be converted."
                )

    def layer_call(self, model: nn.Module, layer: nn.Module, index: int) -> LayerCall:
        forward = getattr(type(layer), "_mod_original", type(layer)).forward
        signature = inspect.signature(forward)
        params = list(signature.parameters)
        if "attn_mask" not in params:
            raise ModAdaptError(
                f"block {index} ({type(layer).__name__}) takes no `attn_mask`; this timm version is too old "
                "(timm >= 1.0.20 is needed)."
            )
        return LayerCall(
            hidden=params[1],
            mask="attn_mask",
            cache=None,
            position_ids=None,
            per_token=(),
            causal=False,
            window=None,
            attn_implementation=lambda: "sdpa",  # timm takes bool masks on both its attention paths
            signature=signature,
            prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        )

    def attention_probe(self, model: nn.Module, layers: list[int]) -> AttentionProbe:
        _, blocks = self.layer_stack(model)
        probe = AttentionProbe(layers)
        for i in layers:
            if not 0 <= i < len(blocks):
                raise ModAdaptError(f"layer {i} is out of range: the model has {len(blocks)} blocks.")
            attn = getattr(blocks[i], "attn", None)
            if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise ModAdaptError(
                    f"block {i}'s attention ({type(attn).__name__}) has no fused `qkv` projection to observe."
                )
            handle = attn.qkv.register_forward_hook(_QKVRecorder(probe, i, attn))
            probe.on_remove(handle.remove)
        return probe

    def analysis_layer_stack(self, model: nn.Module) -> nn.ModuleList | None:
        """Any timm model's `blocks` (not only a VisionTransformer's)."""
        blocks = getattr(model, "blocks", None)
        return blocks if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) else None

    @contextlib.contextmanager
    def attention_maps(self, model: nn.Module, layers: nn.ModuleList, callback: AttentionMapCallback) -> Iterator[None]:
        """The blocks' unfused attention path (inside the context only), hooked where it applies
        `attn_drop` to the softmax probabilities."""
        handles, fused = [], []
        for index, block in enumerate(layers):
            attn = getattr(block, "attn", None)
            if (
                attn is None
                or not isinstance(getattr(attn, "attn_drop", None), nn.Module)
                or not hasattr(attn, "fused_attn")
            ):
                raise ModAdaptError(
                    f"block {index} ({type(block).__name__}) has no timm-style attention (attn.attn_drop); "
                    "ARank cannot read its maps."
                )
            handles.append(
                attn.attn_drop.register_forward_hook(
                    lambda module, args, output, index=index: callback(index, output, False)
                )
            )
            fused.append((attn, attn.fused_attn))
            attn.fused_attn = False
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for attn, value in fused:
                attn.fused_attn = value

    # --- persistence ---------------------------------------------------------------------------
    def describe(self, model: nn.Module) -> dict:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not name:
            raise ModAdaptError(
                "this timm model has no pretrained_cfg['architecture']; create it with timm.create_model."
            )
        kwargs = getattr(model, KWARGS_ATTR, None)
        if kwargs is None:
            kwargs = _read_kwargs(model)
            _check_rebuild(model, name, kwargs)
        return {"library": "timm", "model_name": name, "kwargs": kwargs, "class": type(model).__name__}

    def build(self, directory: str, description: dict) -> nn.Module:
        return create_model(description["model_name"], **description.get("kwargs", {}))


class _QKVRecorder:
    """Forward hook on `attn.qkv`: split heads as timm's Attention does, apply the q/k norms."""

    def __init__(self, probe: AttentionProbe, index: int, attn: nn.Module):
        self.probe, self.index, self.attn = probe, index, attn

    def __call__(self, module, args, output):
        attn = self.attn
        B, N = output.shape[:2]
        qkv = output.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        self.probe.record(self.index, q, k, scale=attn.scale, causal=False)


def _read_kwargs(model: nn.Module) -> dict:
    """Creation arguments of a VisionTransformer, read off its modules."""
    block = model.blocks[0]
    patch = model.patch_embed
    kwargs = {
        "img_size": list(patch.img_size) if patch.img_size is not None else None,
        "patch_size": list(patch.patch_size),
        "in_chans": patch.proj.in_channels,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "class_token": model.cls_token is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(model.no_embed_class),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }
    if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
        kwargs["init_values"] = 1e-5  # LayerScale present; its learned values come from the weights
    return kwargs


def _check_rebuild(model: nn.Module, name: str, kwargs: dict) -> None:
    """Build the described architecture on the meta device and compare parameter shapes."""
    import timm

    try:
        with torch.device("meta"):
            rebuilt = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModAdaptError(
            f"cannot describe this timm model for saving ({exc}); create it with "
            "modadapt.adapters.timm.create_model(name, **kwargs) so its arguments are recorded."
        ) from None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".router." not in k}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ModAdaptError(
            f"the timm model cannot be rebuilt from {name!r} with the arguments read off it (differs at {diff}); "
            "create it with modadapt.adapters.timm.create_model(name, **kwargs) so its arguments are recorded."
        )


def input_size(model: nn.Module, requested: int = 0) -> tuple[int, int, int]:
    """`(C, H, W)` the model takes; a requested size must fit it (clear error otherwise)."""
    patch = model.patch_embed
    native = tuple(patch.img_size) if patch.img_size is not None else None
    chans = patch.proj.in_channels
    if not requested:
        if native is None:
            raise ModAdaptError("this model has no fixed image size; set image_size.")
        return (chans, *native)
    side = (requested, requested)
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    if not dynamic and side != native:
        raise ModAdaptError(
            f"image_size {requested} does not match the model, which takes {native[0]}x{native[1]} images; "
            f"use image_size {native[0]} (or 0), or build the model with img_size={requested} or dynamic_img_size=True."
        )
    if any(s % p for s, p in zip(side, patch.patch_size)):
        raise ModAdaptError(f"image_size {requested} is not a multiple of the patch size {tuple(patch.patch_size)}.")
    return (chans, *side)
