"""Typed configuration: schema, YAML loading with overrides, built-in recipes."""

from tunesmith.config.dump import dump_config
from tunesmith.config.load import (
    build_recipe,
    config_hash,
    default_work_dir,
    load_config,
)
from tunesmith.config.recipes import recipe_names
from tunesmith.config.schema import TrainConfig

__all__ = [
    "TrainConfig",
    "build_recipe",
    "config_hash",
    "default_work_dir",
    "dump_config",
    "load_config",
    "recipe_names",
]
