"""Model merging in mergekit's YAML recipe format, computed tensor by tensor from safetensors checkpoints.

recipe.py parses recipes, methods.py holds the formulas (pure, table-tested against mergekit), plan.py decides every
output tensor from the inputs' headers, run.py reads, merges and writes a few tensors at a time. The entry point is
`merge(recipe, out_dir, seed=None, progress=False)`; `commands.merge_recipe` is its CLI face. search.py searches a
recipe's numbers (space.py: genes <-> recipe) with CMA-ES, scored by `cairn eval` tasks (`commands.search_recipe`)."""

from cairn.merge.recipe import METHODS, Recipe, load_recipe, parse_recipe
from cairn.merge.run import MergeResult, merge

__all__ = ["METHODS", "MergeResult", "Recipe", "load_recipe", "merge", "parse_recipe"]
