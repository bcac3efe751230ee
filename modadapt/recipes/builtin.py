"""Registers the built-in recipes through the same hook third-party plugins use."""

from ..hookspecs import Recipe
from ..plugins import hookimpl
from . import RECIPES


@hookimpl
def register_recipes(register):
    for name, module in RECIPES.items():
        register(Recipe(name, module))
