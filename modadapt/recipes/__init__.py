"""Fine-tuning recipes for converted models.

`RECIPES` maps a recipe name (``modadapt train NAME``) to its module, imported on use. A recipe
module provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""

import importlib
from types import ModuleType

RECIPES = {"vit-imagenet": "modadapt.recipes.vit_imagenet", "lm-adapt": "modadapt.recipes.lm_adapt",
           "llava-adapt": "modadapt.recipes.llava_adapt"}


def recipe_module(name: str) -> ModuleType:
    return importlib.import_module(RECIPES[name])
