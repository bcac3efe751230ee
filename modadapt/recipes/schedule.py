"""What changes over an adaptation run, step by step: how much the routers keep and what learns.

Two ways to ease a pretrained model into skipping tokens, both functions of the optimizer step
only, so a resumed run repeats them exactly:

- **compute warm-up** (`capacity_warmup` steps): every router starts keeping all tokens and its
  share falls linearly to its target (a capacity router's `capacity`, `threshold-p`'s load
  `target`), instead of losing most of its tokens on step 0;
- **router stage** (`router_steps`): the first steps update router parameters only, so the
  routers learn which tokens the unchanged model can spare before the model adapts to them.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModAdaptError


class AdaptationSchedule:
    """Applies the compute warm-up and the router stage to a converted model's routers."""

    def __init__(self, model: nn.Module, *, capacity_warmup: int = 0, router_steps: int = 0):
        from ..convert import mod_layers
        from ..mod_layer import state_of

        self.capacity_warmup = capacity_warmup
        self.router_steps = router_steps
        layers = mod_layers(model) if state_of(model) is not None else []  # lm-adapt's router: none
        self.routers = list({id(layer.router): layer.router for layer in layers}.values())
        if capacity_warmup:
            for router in self.routers:
                if router.target_share is None:
                    raise ModAdaptError(
                        f"capacity_warmup needs a router with a target share of tokens; "
                        f"{router.name!r} here has none (threshold-p: set its target)."
                    )
        self.targets = [router.target_share for router in self.routers]
        self.router_params = {id(p) for router in self.routers for p in router.parameters()}

    def share(self, target: float, step: int) -> float:
        """The share a router whose target is `target` keeps at `step`."""
        if not self.capacity_warmup or step >= self.capacity_warmup:
            return target
        return 1.0 - (1.0 - target) * step / self.capacity_warmup

    def apply(self, step: int) -> None:
        """Set every router's share for optimizer step `step` (before its forward)."""
        if self.capacity_warmup:
            for router, target in zip(self.routers, self.targets):
                router.target_share = self.share(target, step)

    def hold_base(self, step: int, params: list) -> None:
        """During the router stage, drop the gradients of everything but the routers (after the
        backward, before the optimizer step), so that only the routers move."""
        if step < self.router_steps:
            for param in params:
                if id(param) not in self.router_params:
                    param.grad = None

    def finish(self) -> None:
        """The routers' own targets again (what is evaluated and saved)."""
        for router, target in zip(self.routers, self.targets):
            if target is not None:
                router.target_share = target
