"""Fine-tuning recipes for converted models.

Each recipe is a `modadapt.Recipe`: a name (``modadapt train NAME``) and a module that provides
``add_arguments(parser)`` and ``main(args) -> int``, imported on use. The built-in ones (`RECIPES`)
register through the `register_recipes` hook, as a plugin's recipes do.
"""

from types import ModuleType

from ..hookspecs import Recipe
from ..plugins import get_recipe

RECIPES = {
    "vit-imagenet": "modadapt.recipes.vit_imagenet",
    "lm-adapt": "modadapt.recipes.lm_adapt",
    "llava-adapt": "modadapt.recipes.llava_adapt",
}

__all__ = ["RECIPES", "Recipe", "recipe_module"]


def recipe_module(name: str) -> ModuleType:
    """The module of the registered recipe `name`."""
    return get_recipe(name).obj.load()
