"""Routers: which tokens a MoD layer processes. One file per strategy; `base.py` is the contract."""

from .base import Router, RoutingContext, RoutingDecision

__all__ = ["Router", "RoutingContext", "RoutingDecision"]
