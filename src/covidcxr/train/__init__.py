"""Classifier training: recipes, the data module over the preprocessing cache, the Lightning module, runs.

The training stage of the data's journey (DESIGN.md): a YAML recipe
(`covidcxr.train.recipe`) names the data, the task and composition, the preprocessing,
the network and its initialisation/freeze policy, the optimiser and schedule, rigid
augmentation, snapshot ensembles, and the hardware; `train_recipe` turns it into a
resumable run directory with checkpoints, predictions and metrics::

    covidcxr train recipes/demo.yaml --set train.epochs=3

    >>> from covidcxr.train import load_recipe, train_recipe
    >>> result = train_recipe(load_recipe("recipes/demo.yaml"))  # doctest: +SKIP
    >>> result.metrics["test"]["auc"]  # doctest: +SKIP

PyTorch Lightning runs the loop, so ``engine.devices``, ``engine.num_nodes``,
``engine.strategy: ddp`` and ``engine.precision`` scale the same recipe to GPU clusters;
on CPUs with AVX512-BF16/AMX, bf16 autocast + channels_last (the default ``precision:
auto``) trains about 3x faster than fp32.
"""

from covidcxr.train.recipe import TASKS, RecipeError, TrainRecipe, apply_overrides, load_recipe, recipe_from_mapping
from covidcxr.train.run import RunConflictError, RunResult, code_version, read_provenance, resolve_engine, train_recipe

__all__ = [
    "TASKS",
    "RecipeError",
    "RunConflictError",
    "RunResult",
    "TrainRecipe",
    "apply_overrides",
    "code_version",
    "load_recipe",
    "read_provenance",
    "recipe_from_mapping",
    "resolve_engine",
    "train_recipe",
]
