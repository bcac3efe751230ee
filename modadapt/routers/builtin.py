"""Registers the built-in routers through the same hook third-party plugins use."""

from ..plugins import hookimpl
from .attention import AttentionRouter
from .noop_expert import NoopExpertRouter
from .random import RandomRouter
from .shared_vl import SharedVLRouter
from .threshold import ThresholdRouter
from .topk import TopKRouter


@hookimpl
def register_routers(register):
    register(TopKRouter)
    register(ThresholdRouter)
    register(RandomRouter)
    register(AttentionRouter)
    register(SharedVLRouter)
    register(NoopExpertRouter)
